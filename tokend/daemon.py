"""The daemon: wires the parts together and runs a leader's terms.

A term starts with LISTEN, then loads every active integration into the
schedule (so nothing notified during the load is lost), then dispatches
refreshes, consumes notifications and resyncs periodically until
leadership is lost or the daemon stops.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import anyio

from tokend import metrics, oauth, policy
from tokend.config import Config
from tokend.db import Conn, create_pool
from tokend.dispatcher import Dispatcher
from tokend.leader import Leader
from tokend.lifecycle import SCHEDULABLE, LifecycleInvalid, parse_iso
from tokend.listener import Listener
from tokend.refresher import Refresher
from tokend.schedule import Schedule
from tokend.secrets import SecretStore, open_store
from tokend.store import IntegrationKey, LoadedRow, Store

logger = logging.getLogger(__name__)


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
        self.status_counts: dict[str, int] = {}
        self._stop = anyio.Event()
        self._dispatcher: Dispatcher | None = None
        self._term_ended = anyio.Event()
        self.refresher: Refresher | None = None
        self.secrets: SecretStore | None = None

    def stop(self) -> None:
        self._stop.set()
        if self._dispatcher is not None:
            self._dispatcher.stop()

    async def run(self) -> None:
        """Run until stop(); leadership is released on the way out."""
        pool = await create_pool(self.config)
        self.secrets = open_store(self.config, pool)
        try:
            async with oauth.session() as session:
                self.refresher = Refresher(
                    self.config,
                    pool,
                    self.secrets,
                    self.store,
                    self.schedule,
                    session,
                    is_leader=self.leader.is_leader,
                    rng=self.rng,
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.leader.run, self._term)
                    await self._stop.wait()
                    await self._drain()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.secrets.aclose()
                await pool.close()

    async def _drain(self) -> None:
        """Let a running term hand back its in-flight work within the grace."""
        if self._dispatcher is not None:
            with anyio.move_on_after(self.config.daemon.shutdown_grace_s + 1):
                await self._term_ended.wait()

    async def _term(self, conn: Conn) -> None:
        assert self.refresher is not None
        self.schedule.clear()
        listener = Listener(
            self.refresher,
            self.resync,
            refresh_now_interval_s=self.config.scheduler.refresh_now_interval_s,
        )
        await listener.attach(conn, self.config.notify.channel)
        dispatcher = Dispatcher(self.config, self.schedule, self.refresher)
        self._dispatcher = dispatcher
        self._term_ended = anyio.Event()
        if self._stop.is_set():
            return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.run)
                await self.resync()
                tg.start_soon(self._resync_loop)
                await dispatcher.run(self.config.daemon.shutdown_grace_s)
                tg.cancel_scope.cancel()
        finally:
            self._dispatcher = None
            self.schedule.clear()
            self._term_ended.set()

    async def _resync_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.scheduler.resync_interval_s)
            await self.resync()

    async def resync(self) -> None:
        """Reload every active integration and reconcile the schedule."""
        assert self.refresher is not None
        started = time.monotonic()
        now = time.time()
        # Entries older than the load's snapshot and absent from it are gone;
        # entries added meanwhile (by notifications) are newer than it.
        before = self.schedule.nonces()
        seen: set[IntegrationKey] = set()
        backfill: list[IntegrationKey] = []
        async with self.refresher.pool.acquire() as conn:
            async for batch in self.store.load_active(conn):
                for row in batch:
                    seen.add(row.key)
                    self._load_row(row, now, backfill)
            self.status_counts = await self.store.status_counts(conn)
        for key, nonce in before.items():
            if key not in seen:
                self.schedule.drop(key, nonce)
        await self._backfill(backfill)
        self.last_load = time.time()
        for status, count in self.status_counts.items():
            metrics.integrations.labels(status).set(count)
        metrics.heap_entries.set(len(self.schedule))
        logger.info(
            "integrations loaded",
            extra={
                "scheduled": len(self.schedule),
                "backfilled": len(backfill),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    def _load_row(
        self, row: LoadedRow, now: float, backfill: list[IntegrationKey]
    ) -> None:
        if row.status is None:
            backfill.append(row.key)
            return
        if row.status not in SCHEDULABLE or row.reconnect_required == "true":
            self.schedule.drop(row.key)
            return
        try:
            nonce = int(row.nonce or 0)
            deadline = parse_iso(row.next_refresh_at, "nextRefreshAt")
            if deadline is None:
                expires_at = parse_iso(row.expires_at, "expiresAt")
                if expires_at is not None:
                    deadline = policy.deadline(
                        expires_at, now, self.config.scheduler, self.rng
                    )
        except (ValueError, LifecycleInvalid):
            deadline = None
            nonce = 0
        if deadline is None:
            backfill.append(row.key)
            return
        current = self.schedule.get(row.key)
        if current is None or current.nonce != nonce:
            self.schedule.put(row.key, deadline, nonce, row.provider)

    async def _backfill(self, keys: list[IntegrationKey]) -> None:
        """Rows without a usable lifecycle: schedule from stored credentials."""
        assert self.refresher is not None
        refresher = self.refresher
        pending = iter(keys)

        async def worker() -> None:
            for key in pending:
                await refresher.reschedule(key, "backfill")

        async with anyio.create_task_group() as tg:
            for _ in range(min(len(keys), max(1, self.config.database.pool_size // 2))):
                tg.start_soon(worker)

    def status(self) -> dict[str, Any]:
        upcoming = self.schedule.upcoming(10)
        return {
            "role": self.leader.role,
            "instance_id": self.config.instance_id,
            "scheduled": len(self.schedule),
            "counts": self.status_counts,
            "next": [
                {
                    "tenant": str(d.key.tenant),
                    "integration_id": str(d.key.integration_id),
                    "provider": d.provider,
                    "due": d.deadline,
                }
                for d in upcoming
            ],
            "last_load": self.last_load,
        }
