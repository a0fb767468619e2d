"""Postgres plumbing shared by every part: the pool and connection types."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, TypeAlias

import anyio
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
    # What asyncpg raises when the server ends a session under a statement
    # that is just starting ("another operation is in progress").
    asyncpg.InternalClientError,
    NotLeader,
)


async def _keep_session(conn: Conn) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own rollback of
    an open transaction.

    asyncpg's default reset runs `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release: a round trip and four
    statements per refresh. tokend leaves no session state on pooled
    connections (only transaction-scoped advisory locks, cursors inside
    transactions, no LISTEN or SET), so there is nothing to reset;
    tests/test_pool.py checks that this stays true.
    """


async def create_pool(
    config: Config, *, max_size: int | None = None, name: str = "tokend"
) -> asyncpg.Pool:
    db = config.database
    pool = await asyncpg.create_pool(
        db.dsn,
        # No connection at creation: a daemon started while Postgres is down
        # runs (answering /healthz, not /readyz) and connects when it can.
        min_size=0,
        max_size=max_size or db.pool_size,
        timeout=db.connect_timeout_s,
        # Bounds every statement on the client too: a partitioned server
        # must not hang a refresh forever.
        command_timeout=db.statement_timeout_s,
        reset=_keep_session,
        server_settings={
            "application_name": name,
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


class LockedTransaction:
    """A transaction that holds an advisory lock from its first statement.

    BEGIN and `pg_advisory_xact_lock` travel in one round trip (a
    simple-protocol query; the key is an integer, formatted in), saving a
    round trip per unit of work. Reads must come in later statements, never
    in the locking one: a statement's snapshot is taken before it waits for
    the lock, so it would miss what the previous holder committed.

    To asyncpg this is a manually started transaction: `conn.transaction()`
    inside it raises rather than nesting (use SAVEPOINT statements instead).
    """

    def __init__(self, conn: Conn, lock_key: int) -> None:
        self.conn = conn
        self.lock_key = int(lock_key)

    async def start(self) -> None:
        try:
            await self.conn.execute(
                f"BEGIN; SELECT pg_advisory_xact_lock({self.lock_key})"
            )
        except BaseException:
            # The BEGIN may have taken effect: leave no open transaction.
            with anyio.CancelScope(shield=True):
                await self.rollback()
            raise

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.conn.is_closed():
            return
        # A broken connection is discarded by the pool, which ends the
        # transaction on the server.
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self.conn.execute("ROLLBACK")

    async def __aenter__(self) -> LockedTransaction:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            await self.commit()
        else:
            with anyio.CancelScope(shield=True):
                await self.rollback()
