"""Postgres plumbing shared by every part: the pool and connection types."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tokend.config import Config
from tokend.errors import ConfigError, DatabaseError, NotLeader

# A connection of our own, or one borrowed from the pool.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# Errors that mean "this connection or server is not usable now".
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    NotLeader,
)


async def create_pool(config: Config) -> asyncpg.Pool:
    db = config.database
    pool = await asyncpg.create_pool(
        db.dsn,
        # No connection at creation: a daemon started while Postgres is down
        # runs (answering /healthz, not /readyz) and connects when it can.
        min_size=0,
        max_size=db.pool_size,
        timeout=db.connect_timeout_s,
        # Bounds every statement on the client too: a partitioned server
        # must not hang a refresh forever.
        command_timeout=db.statement_timeout_s,
        server_settings={
            "application_name": "tokend",
            "statement_timeout": f"{int(db.statement_timeout_s * 1000)}ms",
            # A refresh holds its transaction across one HTTP call; anything
            # idle much longer is a stuck client and is cut by the server.
            "idle_in_transaction_session_timeout": "120s",
        },
    )
    assert pool is not None
    return pool


async def connect(config: Config, application_name: str) -> asyncpg.Connection:
    """One connection for a command-line tool, failures translated: a DSN
    asyncpg cannot use is the operator's config error (never quoted, it may
    hold a password); an unreachable server is a runtime failure."""
    db = config.database
    try:
        return await asyncpg.connect(
            db.dsn,
            timeout=db.connect_timeout_s,
            command_timeout=db.statement_timeout_s,
            server_settings={"application_name": application_name},
        )
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        problem = f"asyncpg cannot use this DSN ({type(exc).__name__})"
        raise ConfigError("database.dsn", problem) from None
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to the database: {exc}") from exc
