"""Versioned, idempotent schema changes: `tokend migrate`."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

from tokend.keys import lock_key

logger = logging.getLogger(__name__)

# Applied in order, each once; a new change is a new file appended here.
CORE = ("0001_core",)
HOST_TABLE = "host_table"
ACTIVE_TRIGGER = "active_trigger"

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS tokend_schema_version (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _sql(name: str) -> str:
    return (resources.files("tokend") / "sql" / f"{name}.sql").read_text()


async def migrate(
    conn: asyncpg.Connection,
    *,
    host_table: bool = False,
    trigger: bool = False,
    channel: str = "tokend",
) -> list[str]:
    """Apply what is missing; return the names applied now (empty: nothing)."""
    wanted = list(CORE)
    if host_table:
        wanted.append(HOST_TABLE)
    if trigger:
        wanted.append(ACTIVE_TRIGGER)

    applied_now = []
    async with conn.transaction():
        # Two replicas migrating at once queue here instead of racing.
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1)", lock_key("tokend.migrate")
        )
        await conn.execute(_VERSION_TABLE)
        done = {
            r["name"]
            for r in await conn.fetch("SELECT name FROM tokend_schema_version")
        }
        for name in wanted:
            if name in done:
                continue
            sql = _sql(name)
            if name == ACTIVE_TRIGGER:
                sql = sql.replace("()", f"('{channel}')", 1)
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO tokend_schema_version (name) VALUES ($1)", name
            )
            logger.info("schema change applied", extra={"change": name})
            applied_now.append(name)
    return applied_now
