"""The daemon: wires the parts together and runs a leader's terms.

A term starts with LISTEN, then loads every active integration into the
schedule (so nothing notified during the load is lost), then dispatches
refreshes, consumes notifications and resyncs periodically until
leadership is lost or the daemon stops.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import anyio
import asyncpg

from tokend import metrics, oauth, policy
from tokend.config import Config
from tokend.db import CONNECTION_ERRORS, Conn, create_pool
from tokend.dispatcher import Dispatcher
from tokend.errors import ConfigErrors, first_of
from tokend.journal import Journal, journal_cipher
from tokend.leader import Leader
from tokend.lifecycle import STATUSES, LifecycleInvalid, iso, parse_iso
from tokend.listener import Listener
from tokend.refresher import Refresher
from tokend.reload import ReloadRecord, changed_keys, policy_changed, split_reload
from tokend.safekeeping import Safekeeping
from tokend.schedule import ENTRY_SQL, MAX_NONCE, Schedule
from tokend.secrets import SecretStore, open_store
from tokend.store import IntegrationKey, LoadedBatch, LoadedRow, Store

logger = logging.getLogger(__name__)

# How often the leader recounts integrations by status for the metrics.
STATS_INTERVAL_S = 60.0
# How long shutdown waits, after the last term ended, for the lock's release.
RELEASE_TIMEOUT_S = 2.0
# How long a reload waits for the leader to recompute every deadline.
RECOMPUTE_TIMEOUT_S = 60.0

# Failure codes of unschedulable integrations that a change to the provider's
# config (client credentials, token URLs, a provider added) can cure.
_CONFIG_FAILURES = sorted(
    {"provider_not_configured", "client_credentials_missing", "token_url_refused"}
    | oauth.CLIENT_CODES
)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.schedule = Schedule()
        self.store = Store(
            config.database.integrations_table, config.notify.events_channel
        )
        self.leader = Leader(
            config.database.dsn,
            config.leader,
            config.notify.channel,
            connect_timeout_s=config.database.connect_timeout_s,
        )
        self.rng = random.Random()
        self.started_at = time.time()
        self.last_load: float | None = None
        self.last_reload: ReloadRecord | None = None
        self.status_counts: dict[str, int] = {}
        self.tokens_expired = 0
        self._stop = anyio.Event()
        self._dispatcher: Dispatcher | None = None
        self._listener: Listener | None = None
        self._term_ended = anyio.Event()
        self._released = anyio.Event()
        self.refresher: Refresher | None = None
        # Work a reload hands to the running term (see _maintain).
        self._maintenance_wanted = anyio.Event()
        self._maintained = anyio.Event()
        self._recompute = False
        self._revive: set[str] = set()
        # Read at scrape time, so they are never stale.
        metrics.heap_entries.set_function(lambda: len(self.schedule))
        metrics.next_deadline.set_function(self._seconds_to_next_deadline)
        metrics.declare_providers(config.providers)
        self.secrets: SecretStore | None = None

    def stop(self) -> None:
        self._stop.set()
        if self._dispatcher is not None:
            self._dispatcher.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ready(self) -> bool:
        """Connected to Postgres, and leader or follower."""
        leader = self.leader
        return leader.connected and leader.role in ("leader", "follower")

    @property
    def in_flight(self) -> int:
        return self._dispatcher.in_flight if self._dispatcher else 0

    async def run(self) -> None:
        """Run until stop(); leadership is released on the way out.

        The journal is opened first: its pending answers (the spool of the
        last run) are stored before this process competes for leadership,
        and whatever is still pending at the end is spooled again.
        """
        journal = Journal(self.config.daemon.state_dir, journal_cipher(self.config))
        journal.open()
        try:
            await self._run(journal)
        except* ConfigErrors as group:
            # A setting that makes running unsafe (the leader refuses to lead
            # through a pooler): stop with it as a configuration error.
            raise first_of(group) from None
        finally:
            journal.close()

    async def _run(self, journal: Journal) -> None:
        pool = await create_pool(self.config)
        self.secrets = open_store(self.config, pool)
        marks = await create_pool(self.config, max_size=4, name="tokend-marks")
        try:
            async with oauth.session() as session:
                self.refresher = Refresher(
                    self.config,
                    pool,
                    self.secrets,
                    self.store,
                    self.schedule,
                    session,
                    safekeeping=Safekeeping(self.config, journal, marks, self.store),
                    is_leader=self.leader.is_leader,
                    rng=self.rng,
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        self.refresher.safe.run, self.refresher.apply_journaled
                    )
                    tg.start_soon(self._lead)
                    await self._stop.wait()
                    await self._drain()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.secrets.aclose()
                await pool.close()
                await marks.close()

    async def _lead(self) -> None:
        await self.leader.run(self._term)
        self._released.set()

    async def _drain(self) -> None:
        """Let a running term hand back its in-flight work within the grace,
        then let the leader release its lock (it returns once it has)."""
        if self._dispatcher is not None:
            logger.info(
                "draining in-flight refreshes",
                extra={
                    "in_flight": self.in_flight,
                    "grace_s": self.config.daemon.shutdown_grace_s,
                },
            )
            with anyio.move_on_after(self.config.daemon.shutdown_grace_s + 1):
                await self._term_ended.wait()
            with anyio.move_on_after(RELEASE_TIMEOUT_S):
                await self._released.wait()

    # -- reload -----------------------------------------------------------

    async def reload(
        self, new: Config, store_restart: Sequence[str] = ()
    ) -> ReloadRecord:
        """Apply a validated config without dropping leadership.

        Policy, concurrency, rate limits and provider settings take effect at
        once, and every deadline is recomputed; settings bound at start are
        logged as needing a restart and keep their running values.
        """
        old = self.config
        effective, restart = split_reload(old, new)
        restart += store_restart
        changed = changed_keys(old, effective)
        self.config = effective
        if self.refresher is not None:
            self.refresher.config = effective
        if self._dispatcher is not None:
            self._dispatcher.reconfigure(effective)
        if self._listener is not None:
            interval = effective.scheduler.refresh_now_interval_s
            self._listener.refresh_now_interval_s = interval
        if restart:
            logger.warning(
                "config changes need a restart; the running values stay",
                extra={"keys": restart},
            )
        # A reload is the operator saying "I fixed something": integrations
        # stuck for a reason config or app secrets can cure get another try.
        await self._ask_term(
            recompute=policy_changed(old, effective), revive=list(effective.providers)
        )
        record = ReloadRecord(
            time.time(), "success", (), tuple(changed), tuple(restart)
        )
        self.last_reload = record
        return record

    def reload_failed(self, errors: list[str]) -> ReloadRecord:
        self.last_reload = ReloadRecord(time.time(), "failure", tuple(errors))
        return self.last_reload

    async def _ask_term(
        self, *, recompute: bool = False, revive: list[str] | None = None
    ) -> None:
        """Hand work to the leader's term and wait for it (no-op otherwise:
        a new term loads everything under the config it starts with)."""
        if self._dispatcher is None:
            return
        self._recompute |= recompute
        self._revive.update(revive or ())
        done = self._maintained
        self._maintenance_wanted.set()
        with anyio.move_on_after(RECOMPUTE_TIMEOUT_S):
            await done.wait()

    # -- a term -----------------------------------------------------------

    async def _term(self, conn: Conn) -> None:
        assert self.refresher is not None
        self.schedule.clear()
        # A new term loads everything under the config it starts with.
        self._recompute, self._revive = False, set()
        self._maintenance_wanted, self._maintained = anyio.Event(), anyio.Event()
        listener = Listener(
            self.refresher,
            self.resync,
            refresh_now_interval_s=self.config.scheduler.refresh_now_interval_s,
        )
        await listener.attach(conn, self.config.notify.channel)
        if self._stop.is_set():
            return
        dispatcher = Dispatcher(self.config, self.schedule, self.refresher)
        self._dispatcher, self._listener = dispatcher, listener
        self._term_ended = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.run)
                await self.resync()
                tg.start_soon(self._maintain)
                tg.start_soon(self._stats_loop)
                await dispatcher.run()
                tg.cancel_scope.cancel()
        finally:
            self._dispatcher, self._listener = None, None
            self.schedule.clear()
            self._clear_gauges()
            self._maintained.set()
            self._term_ended.set()

    async def _maintain(self) -> None:
        """Resync every `resync_interval_s`; do what a reload asks at once."""
        while True:
            asked = False
            with anyio.move_on_after(self.config.scheduler.resync_interval_s):
                await self._maintenance_wanted.wait()
                asked = True
            self._maintenance_wanted = anyio.Event()
            done, self._maintained = self._maintained, anyio.Event()
            recompute, self._recompute = self._recompute, False
            revive, self._revive = sorted(self._revive), set()
            if revive:
                await self._revive_stranded(revive)
            if recompute or not asked:
                await self.resync(recompute=recompute)
            done.set()

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(STATS_INTERVAL_S)
            assert self.refresher is not None
            try:
                with anyio.fail_after(self.config.database.statement_timeout_s):
                    async with self.refresher.pool.acquire() as conn:
                        await self._count(conn)
            except CONNECTION_ERRORS as exc:
                # The leader's own connection decides leadership; a failed
                # count only leaves the gauges as they were.
                logger.warning(
                    "integration counts not refreshed", extra={"error": str(exc)}
                )

    async def _count(self, conn: Conn) -> None:
        stats = await self.store.stats(conn, time.time())
        self.status_counts = stats.counts
        self.tokens_expired = stats.expired
        for status in (*STATUSES, "none"):
            metrics.integrations.labels(status).set(stats.counts.get(status, 0))
        metrics.tokens_expired.set(stats.expired)

    def _clear_gauges(self) -> None:
        # Only the leader knows these; a follower reporting a former term's
        # figures would keep alerts firing (the rules take max()).
        self.status_counts, self.tokens_expired = {}, 0
        metrics.integrations.clear()
        metrics.tokens_expired.set(0)

    def _seconds_to_next_deadline(self) -> float:
        earliest = self.schedule.next_deadline()
        return math.nan if earliest is None else earliest - time.time()

    async def _revive_stranded(self, providers: list[str]) -> None:
        """Reschedule the integrations a config or secret fix may have cured."""
        assert self.refresher is not None
        async with self.refresher.pool.acquire() as conn:
            keys = await self.store.stranded(conn, providers, _CONFIG_FAILURES)
        await self._reschedule_all(keys, "resync")
        if keys:
            logger.info(
                "unschedulable integrations rescheduled after a reload",
                extra={"count": len(keys)},
            )

    async def resync(self, *, recompute: bool = False) -> None:
        """Reload every active integration and reconcile the schedule.

        With `recompute` (after a policy change), every deadline still ahead
        is computed afresh from the lifecycle's expiresAt.
        """
        assert self.refresher is not None
        started = time.monotonic()
        for name in self.config.providers:
            self.schedule.provider_index(name)
        try:
            backfill = await self._load(recompute)
        except asyncpg.DataError as exc:
            if self.store.validate_times:
                raise
            logger.warning(
                "a lifecycle time that SQL cannot parse; loading again, checking "
                "each time from now on",
                extra={"problem": str(exc)[:200]},
            )
            self.store.validate_times = True
            backfill = await self._load(recompute)
        await self._reschedule_all(backfill, "backfill")
        async with self.refresher.pool.acquire() as conn:
            await self._count(conn)
        self.last_load = time.time()
        logger.info(
            "deadlines recomputed" if recompute else "integrations loaded",
            extra={
                "scheduled": len(self.schedule),
                "backfilled": len(backfill),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def _load(self, recompute: bool) -> list[IntegrationKey]:
        """One pass over the active integrations: the schedule updated, and
        the rows to backfill returned."""
        assert self.refresher is not None
        now = time.time()
        # Entries older than the load's snapshot and absent from it are gone;
        # entries added meanwhile (by notifications) are newer than it.
        unseen = self.schedule.snapshot()
        backfill: list[IntegrationKey] = []

        def consume(batch: LoadedBatch) -> None:
            self.schedule.load(batch.entries, unseen)
            for row in batch.rows:
                self.schedule.seen(unseen, row.key)
                self._load_row(row, now, backfill, recompute)

        async with self.refresher.pool.acquire() as conn:
            await self.store.load_active(
                conn,
                ENTRY_SQL,
                self.schedule.providers,
                consume,
                policy=self.config.scheduler,
                now=now,
                # A recompute judges each row in Python (see _load_row).
                in_sql=not recompute,
            )
        self.schedule.drop_unseen(unseen)
        return backfill

    def _load_row(
        self,
        row: LoadedRow,
        now: float,
        backfill: list[IntegrationKey],
        recompute: bool = False,
    ) -> None:
        # The load leaves to Python only rows that may be scheduled.
        if row.status is None:
            backfill.append(row.key)
            return
        try:
            nonce = int(row.nonce or 0)
            stored = parse_iso(row.next_refresh_at, "nextRefreshAt")
            expires_at = parse_iso(row.expires_at, "expiresAt")
        except (ValueError, LifecycleInvalid):
            backfill.append(row.key)
            return
        if not 0 <= nonce <= MAX_NONCE:
            backfill.append(row.key)
            return
        # A retry keeps its backoff; a scheduled deadline follows the policy.
        by_policy = None
        if expires_at is not None and row.status == "scheduled":
            by_policy = policy.deadline(
                expires_at, now, self.config.scheduler, self.rng
            )
        current = self.schedule.get(row.key)
        if current is not None and current.nonce == nonce:
            if recompute and by_policy is not None and current.deadline > now:
                self.schedule.put(row.key, by_policy, nonce, row.provider)
            return
        # The stored deadline may come from an older policy (a reload the
        # previous leader applied, or not): the earlier of the two never lets
        # a token lapse, and an operator's refresh_now (due now) stays due.
        candidates = [d for d in (stored, by_policy) if d is not None]
        if not candidates:
            backfill.append(row.key)
            return
        self.schedule.put(row.key, min(candidates), nonce, row.provider)

    async def _reschedule_all(self, keys: list[IntegrationKey], source: str) -> None:
        """Schedule each from its stored credentials, a few at a time: rows
        without a usable lifecycle (backfill), or revived after a reload."""
        assert self.refresher is not None
        refresher = self.refresher
        pending = iter(keys)

        async def worker() -> None:
            for key in pending:
                await refresher.reschedule(key, source)

        async with anyio.create_task_group() as tg:
            for _ in range(min(len(keys), max(1, self.config.database.pool_size // 2))):
                tg.start_soon(worker)

    # -- reporting --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        upcoming = self.schedule.upcoming(10)
        return {
            "role": self.leader.role,
            "ready": self.ready(),
            "instance_id": self.config.instance_id,
            "started_at": iso(self.started_at),
            "scheduled": len(self.schedule),
            "in_flight": self.in_flight,
            "counts": self.status_counts,
            "tokens_expired": self.tokens_expired,
            "next": [
                {
                    "tenant": str(d.key.tenant),
                    "integration_id": str(d.key.integration_id),
                    "provider": d.provider,
                    "due": iso(d.deadline),
                    "due_in_s": round(d.deadline - time.time(), 3),
                }
                for d in upcoming
            ],
            "last_load": iso(self.last_load),
            "last_reload": self.last_reload.to_json() if self.last_reload else None,
        }

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        role = self.leader.role
        if not self.leader.connected:
            return f"{role}: connecting to Postgres"
        if role != "leader":
            return f"{role}: waiting for the leader lock"
        earliest = self.schedule.next_deadline()
        due = iso(earliest) if earliest is not None else "none"
        return f"leader: {len(self.schedule)} scheduled, next deadline {due}"
