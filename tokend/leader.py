"""Leadership: one leader among replicas, held by a Postgres advisory lock.

One dedicated autocommit connection carries the lock, LISTEN and the
heartbeat: one failure domain, one liveness check. A follower waits in
`pg_advisory_lock` under a server-side `lock_timeout`, so it takes over the
moment the leader's session ends, and each timeout proves its connection
alive. A client-side cancel never times out that wait (a grant could race
the cancel and leak the lock): on any doubt the connection is discarded,
which releases whatever it held.

A session lock is only as good as the session under it. Behind a pooler
that hands server sessions out per transaction (pgbouncer in transaction
mode), the lock stays on a server session other clients then use, and two
processes can lead at once. So before leading, the lock connection proves
it is one session of its own, and a process that cannot prove it refuses
to lead and stops with an error naming the reason.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from tokend import metrics
from tokend.config import LeaderConfig
from tokend.db import CONNECTION_ERRORS
from tokend.errors import ConfigError, ConfigErrors, NotLeader
from tokend.keys import leader_key

logger = logging.getLogger(__name__)

Term = Callable[[asyncpg.Connection], Awaitable[None]]

_HEARTBEAT = """
SELECT EXISTS (
           SELECT 1 FROM pg_locks
           WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
             AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1
       ) AS held,
       pg_is_in_recovery() AS in_recovery,
       $3 = ANY (SELECT pg_listening_channels()) AS listening
"""

_SESSION = """
SELECT pg_backend_pid() AS pid,
       (SELECT setting::int FROM pg_settings WHERE name = 'lock_timeout')
           AS lock_timeout_ms
"""

_HELD = """
SELECT pg_backend_pid() AS pid,
       EXISTS (
           SELECT 1 FROM pg_locks
           WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
             AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1
       ) AS held
"""

_POOLER_HINT = (
    "; the leader lock needs a connection that is one Postgres session of its "
    "own: point database.dsn at Postgres, or at a pooler in session mode"
)


def _unsafe(problem: str) -> ConfigErrors:
    """Leading on this connection could make two leaders: refuse, for good."""
    return ConfigErrors([ConfigError("database.dsn", problem + _POOLER_HINT)])


class Backoff:
    """Full-jitter exponential backoff that resets after a healthy stretch."""

    def __init__(self, initial_s: float, max_s: float, healthy_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.healthy_s = healthy_s
        self._attempt = 0
        self._since: float | None = None

    def connected(self) -> None:
        self._since = time.monotonic()

    def next_delay(self) -> float:
        if self._since is not None and time.monotonic() - self._since >= self.healthy_s:
            self._attempt = 0
        self._since = None
        ceiling = min(self.max_s, self.initial_s * 2**self._attempt)
        self._attempt += 1
        return random.uniform(0, ceiling)


class Leader:
    def __init__(
        self,
        dsn: str,
        config: LeaderConfig,
        channel: str,
        *,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.config = config
        self.channel = channel
        self.connect_timeout_s = connect_timeout_s
        self.key = leader_key(config.lock_name)
        self.role = "starting"
        self.connected = False
        self._valid_until = 0.0
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s)

    def is_leader(self) -> bool:
        """True only within the lease of the last good heartbeat."""
        return self.role == "leader" and time.monotonic() < self._valid_until

    async def run(self, term: Term) -> None:
        """Follow, lead, step down, until a term ends on its own (at shutdown).
        `term` runs while leading."""
        while True:
            conn = None
            shutdown = False
            try:
                conn = await self._connect()
                self.connected = True
                self._backoff.connected()
                pid = await self._check_session(conn)
                await self._wait_for_lock(conn)
                await self._check_lock(conn, pid)
                await self._lead(conn, term)
                # A term ends on its own only at shutdown: closing the
                # connection (below) releases the lock for a follower.
                shutdown = True
                return
            except* CONNECTION_ERRORS as group:
                self._stepped_down(group.exceptions[0])
            finally:
                self.connected = False
                if self.role == "leader":
                    self._set_role("follower", released=shutdown)
                if conn is not None:
                    conn.terminate()
            metrics.db_reconnects.labels("leader").inc()
            await anyio.sleep(self._backoff.next_delay())

    async def _connect(self) -> asyncpg.Connection:
        c = self.config
        settings = {
            "application_name": "tokend-leader",
            "lock_timeout": f"{int(c.lock_timeout_s * 1000)}ms",
            # The server frees a vanished leader's lock once these expire.
            "tcp_keepalives_idle": str(c.keepalive_idle_s),
            "tcp_keepalives_interval": str(c.keepalive_interval_s),
            "tcp_keepalives_count": str(c.keepalive_count),
            "tcp_user_timeout": str(c.tcp_user_timeout_s * 1000),
        }
        try:
            with anyio.fail_after(self.connect_timeout_s + 1):
                # No cached prepared statements: each would be bound to a
                # server session, and a pooler must be caught by the checks
                # below, not trip over a missing statement first.
                return await asyncpg.connect(
                    self.dsn,
                    timeout=self.connect_timeout_s,
                    server_settings=settings,
                    statement_cache_size=0,
                )
        except asyncpg.ProtocolViolationError as exc:
            if "startup parameter" in str(exc):
                raise _unsafe(
                    "a connection pooler refused the settings the lock connection "
                    f"sets at connect ({exc})"
                ) from None
            raise

    async def _check_session(self, conn: asyncpg.Connection) -> int:
        """The settings sent at connect reached the server session: else a
        pooler dropped them, and with them the server-side lock_timeout."""
        row = await conn.fetchrow(_SESSION)
        assert row is not None
        wanted = int(self.config.lock_timeout_s * 1000)
        if row["lock_timeout_ms"] != wanted:
            raise _unsafe(
                f"lock_timeout on the lock connection is {row['lock_timeout_ms']} ms,"
                f" not the {wanted} ms tokend set at connect: something between "
                "tokend and Postgres drops session settings (a connection pooler?)"
            )
        pid: int = row["pid"]
        return pid

    async def _check_lock(self, conn: asyncpg.Connection, pid: int) -> None:
        """The lock just granted is held by this connection's one session, and
        no other connection can take it."""
        classid, objid = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        row = await conn.fetchrow(_HELD, classid, objid)
        assert row is not None
        if row["pid"] != pid or not row["held"]:
            raise _unsafe(
                "the lock connection moved between Postgres sessions"
                f" (backend {pid}, then {row['pid']}) or lost the lock it was"
                " just granted: a transaction-pooling proxy sits in between"
            )
        with anyio.fail_after(self.connect_timeout_s + 1):
            probe = await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout_s, statement_cache_size=0
            )
        try:
            with anyio.fail_after(self.config.heartbeat_timeout_s):
                got = await probe.fetchrow(
                    "SELECT pg_backend_pid() AS pid,"
                    " pg_try_advisory_xact_lock($1) AS granted",
                    self.key,
                )
        finally:
            await probe.close(timeout=1)
        assert got is not None
        if got["granted"] or got["pid"] == pid:
            raise _unsafe(
                "a second connection was granted the leader lock while the lock "
                f"connection held it (both on backend {got['pid']}): the two "
                "share a server session, as behind a transaction-pooling proxy"
            )

    async def _wait_for_lock(self, conn: asyncpg.Connection) -> None:
        if self.role != "follower":
            self._set_role("follower")
        # Only a dead connection outlasts the server's lock_timeout by this.
        budget = self.config.lock_timeout_s + self.config.heartbeat_timeout_s
        while True:
            try:
                with anyio.fail_after(budget):
                    await conn.execute("SELECT pg_advisory_lock($1)", self.key)
                return
            except asyncpg.LockNotAvailableError:
                continue

    async def _lead(self, conn: asyncpg.Connection, term: Term) -> None:
        self._valid_until = time.monotonic() + self.config.lease_s
        self._set_role("leader")
        async with anyio.create_task_group() as tg:

            def lost(_: Any) -> None:
                self._valid_until = 0.0
                tg.cancel_scope.cancel()

            conn.add_termination_listener(lost)
            tg.start_soon(self._heartbeat, conn)
            await term(conn)
            tg.cancel_scope.cancel()
        # A term ends on its own only at shutdown; a cut connection lands here
        # through the termination callback.
        if conn.is_closed():
            raise NotLeader("the leader connection was closed")

    async def _heartbeat(self, conn: asyncpg.Connection) -> None:
        try:
            await self._beat(conn)
        except Exception:
            # Step down at once: no refresh may start from here on, and the
            # server may free the lock now rather than when the term's
            # in-flight refreshes have finished their shielded writes.
            self._valid_until = 0.0
            conn.terminate()
            raise

    async def _beat(self, conn: asyncpg.Connection) -> None:
        c = self.config
        classid, objid = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        while True:
            await anyio.sleep(c.heartbeat_interval_s)
            started = time.monotonic()
            with anyio.fail_after(c.heartbeat_timeout_s):
                row = await conn.fetchrow(_HEARTBEAT, classid, objid, self.channel)
            assert row is not None  # the query always returns one row
            if not row["held"]:
                raise NotLeader("pg_locks no longer shows the leader lock as ours")
            if row["in_recovery"]:
                raise NotLeader("the server is in recovery (a standby)")
            if not row["listening"]:
                raise NotLeader(f"not listening on channel {self.channel!r}")
            self._valid_until = started + c.lease_s

    def _stepped_down(self, exc: BaseException) -> None:
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]  # the failure itself, not its wrapping
        logger.warning(
            "stepping down" if self.role == "leader" else "database unreachable",
            extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "role": self.role},
        )

    def _set_role(self, role: str, *, released: bool = False) -> None:
        previous, self.role = self.role, role
        metrics.leader.set(1 if role == "leader" else 0)
        if previous != role and "leader" in (previous, role):
            change = "gained" if role == "leader" else "lost"
            metrics.leader_transitions.labels(change).inc()
            message = "leadership released" if released else "leadership " + change
            logger.info(message, extra={"role": role})
