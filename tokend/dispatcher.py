"""The dispatcher: sleeps until the earliest deadline, then hands due
integrations to a bounded pool of refresh workers.

Sleeping is bounded (`max_sleep_s`) and re-checked against the wall clock,
so a clock step never makes it sleep past a deadline. A per-provider rate
limit spreads a crowd of due integrations over time instead of sending
them all at once.
"""

from __future__ import annotations

import logging
import time

import anyio

from tokend.config import Config
from tokend.db import CONNECTION_ERRORS
from tokend.refresher import Refresher
from tokend.schedule import Due, Schedule

logger = logging.getLogger(__name__)


class RateLimit:
    """A token bucket per provider: `rate_per_s` starts, bursts of one second."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def reserve(self, provider: str, rate_per_s: float, now: float) -> float:
        """Seconds to wait before this start is allowed (0 if none)."""
        interval = 1.0 / rate_per_s
        slot = max(self._next.get(provider, 0.0), now - 1.0 + interval)
        self._next[provider] = slot + interval
        return max(0.0, slot - now)


class Dispatcher:
    def __init__(
        self, config: Config, schedule: Schedule, refresher: Refresher
    ) -> None:
        self.config = config
        self.schedule = schedule
        self.refresher = refresher
        self.in_flight = 0
        # A limiter rather than a semaphore: its size can change on reload.
        # Slots are borrowed by the dispatch loop and returned by the worker,
        # so each start borrows on behalf of a token of its own.
        self._slots = anyio.CapacityLimiter(config.scheduler.concurrency)
        self._rate = RateLimit()
        self._stopping = False

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: concurrency and rate limits at once."""
        self.config = config
        self._slots.total_tokens = config.scheduler.concurrency

    def stop(self) -> None:
        """Take no new work; in-flight refreshes go on."""
        self._stopping = True
        self.schedule.wake()

    async def run(self) -> None:
        """Dispatch until stopped, then give in-flight work the shutdown grace
        (read at the stop, so a reload's value counts)."""
        async with anyio.create_task_group() as workers:
            while not self._stopping:
                slot = object()
                await self._slots.acquire_on_behalf_of(slot)
                due = await self._next_due()
                if due is None:
                    self._slots.release_on_behalf_of(slot)
                    break
                await self._rate_wait(due)
                self.in_flight += 1
                workers.start_soon(self._work, due, slot)
            grace_s = self.config.daemon.shutdown_grace_s
            workers.cancel_scope.deadline = anyio.current_time() + grace_s

    async def _next_due(self) -> Due | None:
        max_sleep = self.config.scheduler.max_sleep_s
        while not self._stopping:
            now = time.time()
            due = self.schedule.pop_due(now)
            if due is not None:
                return due
            earliest = self.schedule.next_deadline()
            sleep = max_sleep if earliest is None else min(earliest - now, max_sleep)
            await self.schedule.wait(sleep)
        return None

    async def _rate_wait(self, due: Due) -> None:
        provider = self.config.provider(due.provider)
        if provider is None:
            return
        delay = self._rate.reserve(due.provider, provider.rate_per_s, time.monotonic())
        if delay:
            await anyio.sleep(delay)

    async def _work(self, due: Due, slot: object) -> None:
        try:
            await self.refresher.refresh(due)
        except CONNECTION_ERRORS as exc:
            logger.warning(
                "refresh interrupted by the database; retrying later",
                extra=due.key.log(error=f"{type(exc).__name__}: {exc}"[:200]),
            )
            retry_at = time.time() + self.config.retry.initial_s
            self.schedule.put(due.key, retry_at, due.nonce, due.provider)
        except Exception:
            # One integration's failure (a bad row, a bug) must not stop the
            # others: log it and try again after the first backoff.
            logger.exception("refresh crashed; retrying later", extra=due.key.log())
            retry_at = time.time() + self.config.retry.initial_s
            self.schedule.put(due.key, retry_at, due.nonce, due.provider)
        finally:
            self.in_flight -= 1
            self._slots.release_on_behalf_of(slot)
