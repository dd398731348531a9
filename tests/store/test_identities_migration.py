"""Migration ``0009_identities_credits`` goes down and up again, keeping the tokens, on
SQLite and PostgreSQL."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select

from tokenward.service import TokenSpec
from tokenward.store.engine import MIGRATIONS
from tokenward.store.tables import tokens


def _run(connection, action: str, target: str) -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    getattr(command, action)(config, target)


def _columns(connection) -> tuple[set[str], set[str]]:
    found = inspect(connection)
    return {c["name"] for c in found.get_columns("tokens")}, set(found.get_table_names())


async def test_down_and_up_again(services, admin):
    await services.tokens.create_project(admin.record, "shop")
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["x:y"], uses=5)
    )
    async with services.engine.begin() as conn:
        columns, tables = await conn.run_sync(_columns)
        assert {"identity_id", "refill_amount", "refilled_at"} <= columns
        assert "identities" in tables
        await conn.run_sync(_run, "downgrade", "0009_identities_credits@-1")
        columns, tables = await conn.run_sync(_columns)
        assert "identity_id" not in columns and "identities" not in tables
        await conn.run_sync(_run, "upgrade", "heads")
        columns, tables = await conn.run_sync(_columns)
        assert "identity_id" in columns and "identities" in tables
        kept = (
            await conn.execute(
                select(tokens.c.remaining_uses).where(tokens.c.id == issued.record.id)
            )
        ).scalar()
    assert kept == 5
