"""``tokenward scan``: defined in :mod:`tokenward.leaks.cli` (it starts without the rest of
the CLI); registered here like every other command."""

from tokenward.leaks.cli import scan

__all__ = ["scan"]
