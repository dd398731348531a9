"""First start: data dir, server key, schema, and the first admin credential."""

from __future__ import annotations

from dataclasses import dataclass

from tokenward.dashboard.accounts import create_first_owner
from tokenward.dashboard.security import DashboardKeys
from tokenward.fanout import announce
from tokenward.service import issue_bootstrap_record
from tokenward.settings import Settings, load_hasher, write_new_key_file
from tokenward.store.engine import create_engine, migrate
from tokenward.store.repository import TokenStore
from tokenward.verify import utcnow

BOOTSTRAP_NAME = "bootstrap admin"


@dataclass(slots=True)
class InitResult:
    created: bool
    admin_token: str | None
    token_id: str | None
    #: the first dashboard owner, set only when it was just created (password shown once)
    owner_login: str | None = None
    owner_password: str | None = None


async def initialize(settings: Settings, *, reset: bool = False) -> InitResult:
    """Prepare everything; issue the first admin token unless one exists (or ``reset``).

    ``reset`` revokes earlier bootstrap admin tokens and issues a new one. It never replaces
    the server key: that would make every issued token unverifiable.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    if settings.secret_key is None and not settings.key_file.exists():
        write_new_key_file(settings.key_file)
    hasher = load_hasher(settings)
    engine = create_engine(settings.resolved_database_url)
    try:
        await migrate(engine)
        store = TokenStore(engine)
        owner = await create_first_owner(engine, DashboardKeys(hasher)) or (None, None)
        existing = await store.active_bootstrap_ids(BOOTSTRAP_NAME)
        if existing and not reset:
            return InitResult(False, None, existing[0], *owner)
        now = utcnow()
        for token_id in existing:
            await store.revoke(token_id, "replaced by tokenward init --reset", now)
        await announce(engine, settings.redis_url, existing, settings.redis_prefix)
        issued = issue_bootstrap_record(hasher, now)
        await store.insert_token(issued.record, hasher.hash(issued.secret))
        return InitResult(True, issued.secret, issued.record.id, *owner)
    finally:
        await engine.dispose()
