"""The dashboard's fixtures, for the usage page's tests."""

from tests.test_dashboard import (  # noqa: F401
    _quick_password_hashing,
    accounts,
    clock,
    dash,
)
