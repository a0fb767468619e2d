"""Safekeeping of provider answers: from the request going out to the rotated
token set stored in Postgres, whatever fails in between.

A token endpoint that rotates refresh tokens invalidates the one tokend sent
as it answers, so from the moment a request is out the answer may hold the
only refresh token that still works. Three things keep it:

* the in-flight mark: before the request goes out, the integration's
  lifecycle says who sent it and when, committed on a connection of its own
  (the refresh transaction is still open). A later refresh that finds the
  mark of a process that is gone waits for that process's replay instead
  of spending the old refresh token a second time;
* the journal (`journal.py`): the answer is on local disk, sealed and
  fsynced, before anything else happens to it;
* the replay: an answer whose database write failed stays pending, in memory
  and in the journal, and is stored as soon as the database lets it, with a
  compare-and-set on the refresh token that was sent. The refresher does
  the storing (`Refresher.apply_journaled`); this module decides when.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from tokend import metrics
from tokend.config import Config
from tokend.credentials import Credentials
from tokend.db import CONNECTION_ERRORS
from tokend.errors import JournalError, SecretError, SecretUnavailable
from tokend.journal import Entry, Journal
from tokend.lifecycle import InFlight, Lifecycle
from tokend.store import IntegrationKey, Row, Store

logger = logging.getLogger(__name__)


class Safekeeping:
    def __init__(
        self, config: Config, journal: Journal, marks: asyncpg.Pool, store: Store
    ) -> None:
        self.config = config
        self.journal = journal
        # Marks must commit while the refresh transaction is open, so they
        # use a small pool of their own (never waiting on the refresh pool,
        # which could deadlock it).
        self.marks = marks
        self.store = store
        # Who this process is in an in-flight mark: the instance id alone
        # would be the same again after a restart with a fixed id.
        self.owner = f"{config.instance_id}/{secrets.token_hex(4)}"
        # Integrations whose request is out now, and journal entries that a
        # refresh or a replay is storing now.
        self.calling: set[IntegrationKey] = set()
        self.storing: set[str] = set()
        self._orphaned: anyio.Event | None = None

    # -- around one request ---------------------------------------------------

    async def mark(self, row: Row, current: Lifecycle) -> bool:
        """Commit the in-flight mark; False if the row cannot take it."""
        marked = current.replace(
            status="refreshing", in_flight=InFlight(self.owner, time.time())
        )
        async with self.marks.acquire() as conn:
            return await self.store.write_lifecycle(conn, row.key, marked)

    def keep(
        self, row: Row, secret_name: str, old: Credentials, rotated: Credentials
    ) -> tuple[Entry, float | None]:
        """Put the credentials an answer carries in the journal before
        anything else happens to them.

        Returns the entry and the seconds from answer in hand to durable
        (None if the disk failed).
        """
        received = time.monotonic()
        entry = Entry(
            key=row.key,
            provider=row.provider,
            secret_name=secret_name,
            sent_refresh_token=old.refresh_token,
            credentials=rotated.dumps(),
            received_at=time.time(),
        )
        self.storing.add(entry.id)
        try:
            self.journal.append(entry)
        except JournalError as exc:
            # The database write that follows is what matters; the entry
            # stays pending in memory until it has been made.
            logger.error(
                "provider answer not journaled; storing it in the database only",
                extra=row.key.log(provider=row.provider, error=str(exc)),
            )
            return entry, None
        window_s = time.monotonic() - received
        metrics.journal_window.observe(window_s)
        return entry, window_s

    def settle(self, entry: Entry, stored: bool) -> None:
        """After the refresh transaction: the answer is stored, or orphaned."""
        self.storing.discard(entry.id)
        if stored:
            self.journal.done(entry.id)
        elif self._orphaned is not None:
            # The database failed after the provider answered.
            self._orphaned.set()

    def outstanding(self, key: IntegrationKey) -> bool:
        """Our own request for it is out, or its answer waits to be stored."""
        return key in self.calling or self.journal.pending_for(key) is not None

    def hold_until(
        self, mark: InFlight | None, wait_s: float, timeout_s: float
    ) -> float | None:
        """When a refresh that found `mark` may send the old token again.

        None when the mark is no obstacle: there is none, or it is this
        process's own (its request ended without an answer). Otherwise the
        mark's process or connection died with the request out: its answer
        may be in that process's journal, so the retry waits `wait_s`
        (`inflight_wait_s`) from the moment the orphan was first seen (and at
        least until the request itself must have timed out) for the replay
        that stores it, changes the credentials and clears the mark.
        """
        if mark is None or mark.owner == self.owner:
            return None
        orphaned_at = mark.orphaned_at or time.time()
        return max(orphaned_at + wait_s, mark.since + timeout_s)

    # -- the replay -----------------------------------------------------------

    async def run(self, store: Callable[[Entry], Awaitable[str]]) -> None:
        """Store journaled answers that no refresh is storing: the spool of
        the last run at start, and any whose database write failed.

        Runs for the life of the process, leader or not: `store` is a
        compare-and-set under the integration's lock, safe for anyone.
        """
        failures = 0
        while True:
            self._orphaned = anyio.Event()
            waiting = [
                entry
                for entry in list(self.journal.pending.values())
                if entry.id not in self.storing
            ]
            if not waiting:
                await self._orphaned.wait()
                continue
            try:
                for entry in waiting:
                    await self._store(store, entry)
                failures = 0
            except (*CONNECTION_ERRORS, SecretError, SecretUnavailable) as exc:
                failures += 1
                delay = min(5.0, 0.2 * 2**failures)
                logger.warning(
                    "journaled answers wait for the database",
                    extra={
                        "pending": len(waiting),
                        "error": f"{type(exc).__name__}: {exc}"[:200],
                        "retry_in_s": delay,
                    },
                )
                await anyio.sleep(delay)

    async def _store(
        self, store: Callable[[Entry], Awaitable[str]], entry: Entry
    ) -> None:
        self.storing.add(entry.id)
        try:
            with anyio.fail_after(self.config.database.statement_timeout_s * 2):
                result = await store(entry)
        finally:
            self.storing.discard(entry.id)
        self.journal.done(entry.id)
        metrics.journal_replays.labels(result).inc()
        logger.log(
            logging.INFO if result == "stored" else logging.DEBUG,
            "journaled answer " + result,
            extra=entry.key.log(provider=entry.provider, entry=entry.id),
        )
