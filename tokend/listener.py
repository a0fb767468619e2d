"""Notifications in: the host app's hints about its integrations.

asyncpg's callback only queues the payload; one consumer parses, coalesces
duplicates per integration and hands each integration to the refresher,
which reloads the row under its lock. Bad payloads are counted and logged,
never fatal.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

import anyio
import orjson

from tokend import metrics
from tokend.db import Conn
from tokend.refresher import Refresher
from tokend.store import IntegrationKey

logger = logging.getLogger(__name__)

EVENTS = frozenset(
    {"connected", "disconnected", "refreshed", "reset", "refresh_now", "resync"}
)
# Far more than a burst; past it the queue is dropped and a resync recovers.
MAX_QUEUED = 100_000


class Malformed(ValueError):
    def __init__(self, event: str, reason: str) -> None:
        super().__init__(reason)
        self.event = event


def parse(payload: str) -> tuple[str, IntegrationKey | None]:
    """An event and its integration (None for resync), or Malformed."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Malformed("malformed", "payload is not JSON") from None
    if not isinstance(doc, dict):
        raise Malformed("malformed", "payload is not a JSON object")
    event = doc.get("event")
    if not isinstance(event, str) or event not in EVENTS:
        raise Malformed("unknown", f"unknown event {str(event)[:40]!r}")
    if event == "resync":
        return event, None
    try:
        tenant = UUID(doc["tenant"])
        integration_id = UUID(doc["integration_id"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Malformed(event, "tenant and integration_id must be uuids") from None
    return event, IntegrationKey(tenant, integration_id)


class Listener:
    def __init__(
        self,
        refresher: Refresher,
        resync: Callable[[], Coroutine[Any, Any, None]],
        *,
        refresh_now_interval_s: float = 60.0,
        concurrency: int = 8,
    ) -> None:
        self.refresher = refresher
        self.resync = resync
        self.refresh_now_interval_s = refresh_now_interval_s
        self._queue: deque[str] = deque()
        self._ready = anyio.Event()
        self._pending: dict[IntegrationKey, list[str]] = {}
        self._busy: set[IntegrationKey] = set()
        self._overflowed = False
        self._last_refresh_now: dict[IntegrationKey, float] = {}
        self._last_warning = -math.inf
        self._suppressed = 0
        self._limiter = anyio.CapacityLimiter(concurrency)

    async def attach(self, conn: Conn, channel: str) -> None:
        await conn.add_listener(channel, self._on_notify)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Runs inside asyncpg's protocol: queue and return, nothing more.
        if len(self._queue) >= MAX_QUEUED:
            self._overflowed = True
        else:
            self._queue.append(str(payload))
        self._ready.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await self._ready.wait()
                self._ready = anyio.Event()
                if await self._drain():
                    tg.start_soon(self.resync)
                for key in [k for k in self._pending if k not in self._busy]:
                    self._busy.add(key)
                    tg.start_soon(self._process, key, self._pending.pop(key))

    async def _drain(self) -> bool:
        """Parse the queue into per-integration work; True if a resync is due."""
        resync = self._overflowed
        if resync:
            logger.warning("notification queue overflowed; resyncing everything")
            self._queue.clear()
            self._overflowed = False
        while self._queue:
            payload = self._queue.popleft()
            try:
                event, key = parse(payload)
            except Malformed as exc:
                metrics.notifications.labels(exc.event, "malformed").inc()
                self._warn_malformed(exc, len(payload))
                continue
            if key is None:
                metrics.notifications.labels(event, "ok").inc()
                resync = True
                continue
            events = self._pending.setdefault(key, [])
            if event in events:
                metrics.notifications.labels(event, "coalesced").inc()
            else:
                events.append(event)
        return resync

    def _warn_malformed(self, exc: Malformed, size: int) -> None:
        """One warning a second at most: a flood of junk must not flood the
        log too (the metric counts every one)."""
        now = time.monotonic()
        if now - self._last_warning < 1.0:
            self._suppressed += 1
            return
        logger.warning(
            "malformed notification ignored",
            extra={"problem": str(exc), "bytes": size, "suppressed": self._suppressed},
        )
        self._last_warning, self._suppressed = now, 0

    async def _process(self, key: IntegrationKey, events: list[str]) -> None:
        try:
            async with self._limiter:
                for event in events:
                    result = await self._handle_safely(event, key)
                    metrics.notifications.labels(event, result).inc()
                    if result == "unknown":
                        logger.warning(
                            "notification for an unknown integration",
                            extra=key.log(event=event),
                        )
        finally:
            self._busy.discard(key)
            if key in self._pending:
                self._ready.set()

    async def _handle_safely(self, event: str, key: IntegrationKey) -> str:
        """One integration's notification never stops the listener: an
        unexpected failure is logged with its traceback and counted."""
        try:
            return await self._handle(event, key)
        except Exception:
            logger.exception("notification handling failed", extra=key.log(event=event))
            return "error"

    async def _handle(self, event: str, key: IntegrationKey) -> str:
        refresher = self.refresher
        if event == "connected":
            return await refresher.reschedule(
                key, "oauth_connected", clear_reconnect=True
            )
        if event == "reset":
            return await refresher.reschedule(key, "reconnected", clear_reconnect=True)
        if event == "refreshed":
            return await refresher.reschedule(key, "lazy_refresh_success")
        if event == "disconnected":
            return await refresher.deactivate(key)
        return await self._refresh_now(key)

    async def _refresh_now(self, key: IntegrationKey) -> str:
        now = time.monotonic()
        last = self._last_refresh_now.get(key)
        if last is not None and now - last < self.refresh_now_interval_s:
            return "rate_limited"
        if len(self._last_refresh_now) >= MAX_QUEUED:
            # Only entries within the interval matter; the rest can go.
            horizon = now - self.refresh_now_interval_s
            recent = self._last_refresh_now.items()
            self._last_refresh_now = {k: t for k, t in recent if t > horizon}
        self._last_refresh_now[key] = now
        return await self.refresher.reschedule(key, "retry", immediate=True)
