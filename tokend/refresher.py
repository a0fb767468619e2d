"""The unit of work on one integration: refresh it, or reschedule it.

Both run in one transaction under the integration's advisory lock (the same
lock a host app takes for its lazy refresh), so no two parties ever rotate
one refresh token at once. Heap changes are applied after the commit.

A refresh that reaches the token endpoint marks itself in flight first,
puts the answer in the journal before anything else, and leaves an answer
the database could not take to be replayed (`safekeeping.py`). A refresh
that finds another process's mark under the lock waits for that process's
replay before it sends the old refresh token again.

This module is past the size we aim for (about 700 lines). Its seams are
rescheduling without a refresh (`reschedule`, `deactivate`, `_plan`) and
refreshes left unfinished (`_held_back`, `apply_journaled`); both lean on
the lifecycle helpers below (`_commit`, `_succeeded`, `_apply`), so the
split is a change of its own, to be made when no other work is in flight
in this file.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import anyio
import asyncpg

from tokend import metrics, oauth, policy
from tokend.config import Config
from tokend.credentials import Credentials, CredentialsInvalid
from tokend.db import Conn
from tokend.errors import SecretError, SecretUnavailable, TokenURLRefused
from tokend.journal import Entry
from tokend.lifecycle import Failure, InFlight, Lifecycle
from tokend.providers import Provider
from tokend.safekeeping import Safekeeping
from tokend.schedule import Due, Schedule
from tokend.secrets import APP, SecretStore
from tokend.store import Event, IntegrationKey, Row, Store

logger = logging.getLogger(__name__)

REFRESHED = "INTEGRATION_TOKEN_REFRESHED"
RECOVERED = "INTEGRATION_TOKEN_RECOVERED"
FAILED = "INTEGRATION_TOKEN_REFRESH_FAILED"
RECONNECT = "INTEGRATION_RECONNECT_REQUIRED"
EXPIRING = "INTEGRATION_TOKEN_EXPIRING"

NOT_CONFIGURED = "provider_not_configured"
# A token_type worth naming in a log line; anything else could be an echo.
_TOKEN_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}")


class Unschedulable(Exception):
    """This integration cannot be refreshed until someone changes something."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Secrets:
    credentials: Credentials
    client_id: str
    client_secret: str = field(repr=False)


@dataclass
class _Work:
    """One transaction's outcome, applied to the heap after commit."""

    key: IntegrationKey
    provider: str
    lifecycle: Lifecycle | None = None
    events: tuple[Event, ...] = ()
    outcome: str | None = None
    unconfigured: bool = False
    # A provider answer in the journal, the credentials it carries, whether
    # they reached the secret store, and how long the journal took.
    journaled: Entry | None = None
    rotated: Credentials | None = None
    rotated_stored: bool = False
    window_s: float | None = None


class Refresher:
    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool,
        secrets: SecretStore,
        store: Store,
        schedule: Schedule,
        session: aiohttp.ClientSession,
        *,
        safekeeping: Safekeeping,
        is_leader: Callable[[], bool] = lambda: True,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.secrets = secrets
        self.store = store
        self.schedule = schedule
        self.session = session
        self.safe = safekeeping
        self.is_leader = is_leader
        self.rng = rng or random.Random()
        # The unschedulable reason last logged per integration: log each once.
        self._reported: dict[IntegrationKey, str] = {}
        # Unconfigured providers already logged: once per name, not per row.
        self._unconfigured: set[str] = set()

    @property
    def providers(self) -> Mapping[str, Provider]:
        return {name: Provider(name, p) for name, p in self.config.providers.items()}

    # -- the refresh ------------------------------------------------------

    async def refresh(self, due: Due) -> str:
        """Refresh one due integration; return the outcome label."""
        started = time.monotonic()
        metrics.refresh_lateness.observe(max(0.0, time.time() - due.deadline))
        work = _Work(due.key, due.provider)
        committed = False
        try:
            async with self.pool.acquire() as conn:
                transaction = self.store.locked(conn, due.key)
                await transaction.start()
                try:
                    row = await self.store.read(conn, due.key)
                    await self._refresh_locked(conn, row, due, work)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await transaction.rollback()
                    raise
                # A rotated token is committed even if shutdown's grace runs
                # out now.
                with anyio.CancelScope(shield=True):
                    await transaction.commit()
                committed = True
        finally:
            if work.journaled is not None:
                stored = committed and work.rotated_stored
                self.safe.settle(work.journaled, stored)
        self._apply(work)
        outcome = work.outcome or "skipped"
        # Provider names come from the host's rows: only configured ones
        # become label values, so a stray value cannot grow the metrics.
        label = work.provider if work.provider in self.config.providers else "other"
        metrics.refreshes.labels(label, outcome).inc()
        if outcome != "skipped":
            metrics.refresh_duration.labels(label).observe(time.monotonic() - started)
        return outcome

    async def _refresh_locked(
        self, conn: Conn, row: Row | None, due: Due, work: _Work
    ) -> None:
        current = self._current(row)
        if row is None or current is None:
            return
        if current.schedule_nonce != due.nonce:
            # Someone rescheduled meanwhile: follow the stored schedule.
            logger.debug("stale entry dropped", extra=due.key.log(nonce=due.nonce))
            work.lifecycle = current if row.is_active else None
            return
        if not row.is_active or not current.schedulable or not self.is_leader():
            return
        if self.safe.outstanding(row.key):
            # Our own request for it is out, or its answer waits for the
            # database: look again shortly rather than ask twice.
            self._hold(current, time.time() + self.config.retry.initial_s, work)
            return
        try:
            found = await self._read_secrets(conn, row)
            url = self._provider(row).token_url(
                found.credentials.instance_url or row.instance_url
            )
        except Unschedulable as exc:
            await self._unschedulable(conn, row, current, exc, work)
            return
        except TokenURLRefused as exc:
            error = Unschedulable("token_url_refused", str(exc))
            await self._unschedulable(conn, row, current, error, work)
            return
        except SecretUnavailable as exc:
            await self._store_failed(conn, row, current, exc, work)
            return
        known = current.expires_at
        if known is None or found.credentials.expires_at > known + 1:
            # The stored token is newer than the one we scheduled for (or we
            # never saw one: the store failed when it was scheduled): someone
            # else refreshed and forgot to tell us.
            await self._plan(conn, row, current, found.credentials, "resync", work)
            return
        if await self._held_back(conn, row, current, work):
            return
        await self._call(conn, row, current, found, url, work)

    async def _call(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        found: Secrets,
        url: str,
        work: _Work,
    ) -> None:
        provider = self._provider(row)
        now = time.time()
        metrics.token_remaining.observe(max(0.0, found.credentials.expires_at - now))
        # Debug: at info, every refresh would log twice (its outcome is info).
        logger.debug(
            "refresh started",
            extra=row.key.log(provider=row.provider, nonce=current.schedule_nonce),
        )
        grant = oauth.Grant(
            url=url,
            refresh_token=found.credentials.refresh_token,
            client_id=found.client_id,
            client_secret=found.client_secret,
            client_auth=provider.config.client_auth,
            scope=provider.config.scope,
        )
        if not await self.safe.mark(row, current):
            return
        # Once the request is out, its answer may hold the only refresh token
        # the provider still accepts: nothing cancels it from here on (the
        # request has its own timeout, every statement a statement timeout).
        with anyio.CancelScope(shield=True):
            self.safe.calling.add(row.key)
            try:
                outcome = await oauth.request_refresh(
                    self.session,
                    grant,
                    timeout_s=provider.config.request_timeout_s,
                    max_body_bytes=provider.config.max_body_bytes,
                    default_expires_in_s=provider.config.default_expires_in_s,
                )
                self._keep(row, found.credentials, outcome, work)
            finally:
                self.safe.calling.discard(row.key)
            await self._record(conn, row, current, found, outcome, now, work)

    def _keep(
        self, row: Row, sent: Credentials, outcome: oauth.Outcome, work: _Work
    ) -> None:
        """Journal whatever the answer carries that the provider may not
        give again: a rotated token set, or a salvaged refresh token."""
        if outcome.tokens is not None:
            rotated = self._rotated(sent, outcome.tokens)
        elif outcome.salvaged_refresh_token not in (None, sent.refresh_token):
            assert outcome.salvaged_refresh_token is not None
            rotated = self._salvaged(sent, outcome.salvaged_refresh_token)
        else:
            return
        name = self._provider(row).config.credentials_secret
        work.rotated = rotated
        work.journaled, work.window_s = self.safe.keep(row, name, sent, rotated)

    async def _record(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        found: Secrets,
        outcome: oauth.Outcome,
        now: float,
        work: _Work,
    ) -> None:
        """Persist what the token endpoint answered (shielded by the caller:
        once the provider may have rotated, the answer must be written)."""
        attempt = current.replace(last_refresh_attempt_at=now)
        if outcome.kind == "success":
            assert outcome.tokens is not None and work.rotated is not None
            self._warn_odd_answer(row, outcome.tokens)
            try:
                await self._succeeded(
                    conn, row, attempt, found.credentials.expires_at, work.rotated, work
                )
            except SecretUnavailable as exc:
                # The journal keeps the answer; the replay stores it once the
                # store is back, and until then no refresh sends the old token.
                logger.error(
                    "rotated credentials could not be stored",
                    extra=row.key.log(
                        provider=row.provider, code=exc.code, kept="journal"
                    ),
                )
                await self._store_failed(conn, row, attempt, exc, work)
        elif outcome.kind == "reconnect_required":
            await self._rejected(conn, row, attempt, found.credentials, outcome, work)
        elif outcome.kind == "client_rejected":
            error = Unschedulable(outcome.code, outcome.message)
            await self._unschedulable(conn, row, attempt, error, work, outcome)
        else:
            sent = found.credentials
            if work.rotated is not None:
                sent = await self._keep_refresh_token(conn, row, work.rotated, work)
            await self._retry(conn, row, attempt, sent.expires_at, outcome, work)

    def _rotated(self, old: Credentials, answer: oauth.TokenSet) -> Credentials:
        """The credentials a successful answer makes of the old ones."""
        extra = old.extra
        kind = answer.token_type
        if kind and (kind.lower() != "bearer" or "token_type" in extra):
            # The host app must not send a non-bearer token as Bearer: say
            # what it is, in the secret (bearer sets stay as the host wrote).
            extra = {**extra, "token_type": kind}
        return Credentials(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token or old.refresh_token,
            expires_at_ms=answer.expires_at_ms,
            instance_url=old.instance_url,
            extra=extra,
        )

    def _salvaged(self, old: Credentials, refresh_token: str) -> Credentials:
        """The old credentials with the refresh token of an unusable 200
        answer (the rest of it is dropped): the provider may already have
        retired the one sent."""
        return Credentials(
            access_token=old.access_token,
            refresh_token=refresh_token,
            expires_at_ms=old.expires_at_ms,
            instance_url=old.instance_url,
            extra=old.extra,
        )

    def _warn_odd_answer(self, row: Row, answer: oauth.TokenSet) -> None:
        if answer.expires_in_defaulted:
            logger.warning(
                "token endpoint sent no expires_in; assuming the default lifetime",
                extra=row.key.log(provider=row.provider),
            )
        kind = answer.token_type
        if kind and kind.lower() != "bearer":
            logger.warning(
                "token endpoint sent a token_type other than bearer; stored as is",
                extra=row.key.log(
                    provider=row.provider,
                    answer_type=kind if _TOKEN_TYPE.fullmatch(kind) else "unusual",
                ),
            )

    async def _succeeded(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        old_expires_at: float,
        rotated: Credentials,
        work: _Work,
        name: str | None = None,
    ) -> None:
        name = name or self._provider(row).config.credentials_secret
        await self.secrets.put(row.key.tenant, name, rotated.dumps(), conn=conn)
        work.rotated_stored = True
        now = time.time()
        healed = current.consecutive_failures > 0
        lifecycle = self._scheduled(
            current, rotated.expires_at, now, "proactive_refresh_success"
        ).replace(last_refresh_at=now)
        events = [self._event(REFRESHED, row, rotated.expires_at)]
        if healed:
            events.append(self._event(RECOVERED, row, rotated.expires_at))
        await self._commit(conn, row, lifecycle, events, "success", work)
        window_ms = None if work.window_s is None else round(work.window_s * 1000, 3)
        logger.info(
            "refresh succeeded",
            extra=row.key.log(
                provider=row.provider,
                old_expires_at=old_expires_at,
                new_expires_at=rotated.expires_at,
                next_refresh_at=lifecycle.next_refresh_at,
                journal_ms=window_ms,
            ),
        )

    async def _rejected(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        sent: Credentials,
        outcome: oauth.Outcome,
        work: _Work,
    ) -> None:
        # The host app may have rotated the token a moment ago without our
        # lock: a changed refresh token means someone else refreshed.
        try:
            again = await self._rotated_elsewhere(conn, row, sent)
        except SecretUnavailable as exc:
            # Whether someone else rotated cannot be told now: wait, never
            # mark reconnect-required on a guess.
            await self._store_failed(conn, row, current, exc, work)
            return
        if again is not None:
            logger.info(
                "refresh token rotated by another party; rescheduling",
                extra=row.key.log(provider=row.provider),
            )
            await self._plan(
                conn,
                row,
                current,
                again,
                "lazy_refresh_success",
                work,
                outcome="rotated_elsewhere",
            )
            return
        now = time.time()
        failure = self._failure(outcome, now)
        lifecycle = current.replace(
            status="reconnect_required",
            schedule_nonce=current.schedule_nonce + 1,
            next_refresh_at=None,
            reconnect_required=True,
            reconnect_reason=f"refresh token rejected ({outcome.code})",
            consecutive_failures=current.consecutive_failures + 1,
            last_refresh_failure=failure.to_json(),
            owner_id=self.config.instance_id,
        )
        event = self._event(RECONNECT, row, sent.expires_at, outcome)
        await self._commit(conn, row, lifecycle, [event], "reconnect_required", work)
        logger.warning(
            "reconnect required: the refresh token was rejected",
            extra=row.key.log(
                provider=row.provider,
                error_code=outcome.code,
                http_status=outcome.http_status,
            ),
        )

    async def _rotated_elsewhere(
        self, conn: Conn, row: Row, sent: Credentials
    ) -> Credentials | None:
        """The stored credentials if their refresh token is no longer the one
        sent, looking twice: now, and after `rotation_recheck_s` (each read
        is a new snapshot: the transaction is READ COMMITTED)."""
        for wait_s in (0.0, self.config.retry.rotation_recheck_s):
            if wait_s:
                await anyio.sleep(wait_s)
            try:
                stored = (await self._read_secrets(conn, row)).credentials
            except Unschedulable:
                continue
            if stored.refresh_token != sent.refresh_token:
                return stored
        return None

    async def _retry(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        expires_at: float | None,
        outcome: oauth.Outcome,
        work: _Work,
    ) -> None:
        now = time.time()
        failures = current.consecutive_failures + 1
        delay = policy.backoff(
            failures, self.config.retry, self.rng, outcome.retry_after_s
        )
        lifecycle = current.replace(
            status="retrying",
            schedule_nonce=current.schedule_nonce + 1,
            expires_at=expires_at,
            next_refresh_at=now + delay,
            last_scheduled_at=now,
            last_schedule_source="retry",
            consecutive_failures=failures,
            last_refresh_failure=self._failure(outcome, now).to_json(),
            owner_id=self.config.instance_id,
        )
        events = [self._event(FAILED, row, expires_at, outcome)]
        if expires_at is not None and self._lapsing(current, expires_at, now + delay):
            events.append(self._event(EXPIRING, row, expires_at, outcome))
            lifecycle = lifecycle.replace(expiring_notified_for=expires_at)
        await self._commit(conn, row, lifecycle, events, "transient", work)
        logger.warning(
            "refresh failed; will retry",
            extra=row.key.log(
                provider=row.provider,
                http_status=outcome.http_status,
                error_code=outcome.code,
                error=outcome.message,
                retry_in_s=round(delay, 1),
            ),
        )

    def _lapsing(self, current: Lifecycle, expires_at: float, retry_at: float) -> bool:
        """The next try comes too close to the expiry, and no EXPIRING event
        went out for this expiry yet (compared to the millisecond its JSON
        keeps): one a lapse."""
        notified = current.expiring_notified_for
        near = retry_at >= expires_at - self.config.retry.expiring_warning_s
        return near and (notified is None or abs(notified - expires_at) > 0.001)

    async def _keep_refresh_token(
        self, conn: Conn, row: Row, kept: Credentials, work: _Work
    ) -> Credentials:
        """Store the salvaged refresh token of an unusable 200 answer."""
        name = self._provider(row).config.credentials_secret
        await self.secrets.put(row.key.tenant, name, kept.dumps(), conn=conn)
        work.rotated_stored = True
        logger.warning(
            "unusable answer carried a new refresh token; kept it, will retry",
            extra=row.key.log(provider=row.provider),
        )
        return kept

    # -- refreshes left unfinished ----------------------------------------

    def _hold(self, current: Lifecycle, until: float, work: _Work) -> None:
        """Look at this integration again at `until` (heap only, same nonce)."""
        work.lifecycle = current.replace(next_refresh_at=until)

    async def _held_back(
        self, conn: Conn, row: Row, current: Lifecycle, work: _Work
    ) -> bool:
        """True if another process's unfinished refresh must be waited for
        (`Safekeeping.hold_until` says why and how long)."""
        mark = current.in_flight
        timeout_s = self._provider(row).config.request_timeout_s
        wait_s = self.config.daemon.inflight_wait_s
        until = self.safe.hold_until(mark, wait_s, timeout_s)
        if mark is None or until is None:
            return False
        now = time.time()
        extra = row.key.log(provider=row.provider, owner=mark.owner)
        if now >= until:
            logger.warning(
                "a refresh left in flight by another process was not replayed;"
                " retrying with the stored refresh token",
                extra=extra,
            )
            return False
        if mark.orphaned_at is not None:
            self._hold(current, until, work)
            return True
        metrics.inflight_waits.inc()
        logger.warning(
            "refresh left in flight by another process; waiting for its replay",
            extra={**extra, "wait_s": round(until - now, 1)},
        )
        lifecycle = current.replace(
            status="refreshing",
            schedule_nonce=current.schedule_nonce + 1,
            next_refresh_at=until,
            last_scheduled_at=now,
            last_schedule_source="retry",
            in_flight=InFlight(mark.owner, mark.since, now),
            owner_id=self.config.instance_id,
        )
        await self._commit(conn, row, lifecycle, [], None, work, keep_mark=True)
        return True

    async def apply_journaled(self, entry: Entry) -> str:
        """Store a journaled answer if the stored refresh token is still the
        one that was sent for it; return what happened."""
        work = _Work(entry.key, entry.provider)
        async with self.pool.acquire() as conn, self.store.locked(conn, entry.key):
            result = await self._apply_journaled_locked(conn, entry, work)
        self._apply(work)
        return result

    async def _apply_journaled_locked(
        self, conn: Conn, entry: Entry, work: _Work
    ) -> str:
        row = await self.store.read(conn, entry.key)
        if row is None:
            return "discarded"
        key = (entry.key.tenant, entry.secret_name)
        raw = (await self.secrets.get_many([key], conn=conn)).get(key)
        try:
            stored = Credentials.parse(raw) if raw is not None else None
        except CredentialsInvalid:
            stored = None
        rotated = Credentials.parse(entry.credentials)
        if stored is not None and (stored.access_token, stored.refresh_token) == (
            rotated.access_token,
            rotated.refresh_token,
        ):
            return "already_stored"
        if stored is None or stored.refresh_token != entry.sent_refresh_token:
            # Someone stored newer credentials (a reconnect, the host app's
            # lazy refresh, a retry that won): this answer is history.
            return "superseded"
        current = self._current(row)
        if not row.is_active or current is None or current.status == "inactive":
            await self.secrets.put(
                entry.key.tenant, entry.secret_name, entry.credentials, conn=conn
            )
            return "stored"
        await self._succeeded(
            conn, row, current, stored.expires_at, rotated, work, entry.secret_name
        )
        return "stored"

    # -- rescheduling without a refresh -----------------------------------

    async def reschedule(
        self,
        key: IntegrationKey,
        source: str,
        *,
        clear_reconnect: bool = False,
        immediate: bool = False,
    ) -> str:
        """Recompute an integration's deadline from its stored credentials.

        Used for `connected`, `refreshed`, `reset`, `refresh_now` and
        backfill. Returns what happened: scheduled, unschedulable, inactive,
        unknown or ignored.
        """
        work = _Work(key, "")
        async with self.pool.acquire() as conn, self.store.locked(conn, key):
            row = await self.store.read(conn, key)
            result = await self._reschedule_locked(
                conn, row, source, clear_reconnect, immediate, work
            )
        self._apply(work)
        return result

    async def deactivate(self, key: IntegrationKey) -> str:
        """`disconnected`: no more refreshes until the next `connected`."""
        work = _Work(key, "")
        async with self.pool.acquire() as conn, self.store.locked(conn, key):
            row = await self.store.read(conn, key)
            current = self._current(row)
            if row is None or current is None:
                return "unknown"
            await self._deactivate_locked(conn, row, current, work)
        self._apply(work)
        return "inactive"

    async def _deactivate_locked(
        self, conn: Conn, row: Row, current: Lifecycle, work: _Work
    ) -> None:
        lifecycle = current.replace(
            status="inactive",
            schedule_nonce=current.schedule_nonce + 1,
            next_refresh_at=None,
            owner_id=self.config.instance_id,
        )
        await self._commit(conn, row, lifecycle, [], None, work)

    async def _reschedule_locked(
        self,
        conn: Conn,
        row: Row | None,
        source: str,
        clear_reconnect: bool,
        immediate: bool,
        work: _Work,
    ) -> str:
        current = self._current(row)
        if row is None or current is None:
            return "unknown"
        work.provider = row.provider
        if not row.is_active:
            if current.status != "inactive":
                await self._deactivate_locked(conn, row, current, work)
            return "inactive"
        if current.status == "inactive" and source != "oauth_connected":
            return "ignored"
        if clear_reconnect:
            current = current.replace(
                status="scheduled",
                reconnect_required=False,
                reconnect_reason=None,
                consecutive_failures=0,
                last_refresh_failure=None,
            )
        elif current.reconnect_required:
            return "ignored"
        try:
            found = await self._read_secrets(conn, row)
        except Unschedulable as exc:
            await self._unschedulable(conn, row, current, exc, work)
            return "unschedulable"
        except SecretUnavailable as exc:
            await self._store_failed(conn, row, current, exc, work)
            return "retrying"
        await self._plan(conn, row, current, found.credentials, source, work, immediate)
        return "scheduled"

    async def _plan(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        credentials: Credentials,
        source: str,
        work: _Work,
        immediate: bool = False,
        outcome: str | None = None,
    ) -> None:
        now = time.time()
        lifecycle = self._scheduled(current, credentials.expires_at, now, source)
        if immediate:
            lifecycle = lifecycle.replace(next_refresh_at=now)
        await self._commit(conn, row, lifecycle, [], outcome, work)
        logger.info(
            "refresh scheduled",
            extra=row.key.log(
                provider=row.provider,
                source=source,
                nonce=lifecycle.schedule_nonce,
                next_refresh_at=lifecycle.next_refresh_at,
            ),
        )

    # -- helpers ----------------------------------------------------------

    def _current(self, row: Row | None) -> Lifecycle | None:
        if row is None:
            return None
        if row.lifecycle_error is not None:
            logger.warning(
                "stored lifecycle is malformed; starting a new one",
                extra=row.key.log(problem=row.lifecycle_error),
            )
            # The new one continues from the nonce the schedule knows, so its
            # entry is not stale and what is written next supersedes it.
            return Lifecycle(schedule_nonce=max(self.schedule.nonce(row.key), 0))
        return row.lifecycle or Lifecycle()

    def _provider(self, row: Row) -> Provider:
        config = self.config.provider(row.provider)
        if config is None:
            raise Unschedulable(
                NOT_CONFIGURED,
                f"provider {row.provider[:64]!r} is not configured in tokend; "
                "add it under [providers] and send `reset` or `connected`",
            )
        return Provider(row.provider, config)

    async def _read_secrets(self, conn: Conn, row: Row) -> Secrets:
        provider = self._provider(row).config
        tenant = row.key.tenant
        ids = (provider.client_id_secret, provider.client_secret_secret)
        wanted = [(tenant, provider.credentials_secret)]
        wanted += [(owner, name) for owner in (tenant, APP) for name in ids]
        try:
            found = await self.secrets.get_many(wanted, conn=conn)
        except SecretError as exc:
            raise Unschedulable("credentials_unreadable", str(exc)) from None
        raw = found.get(wanted[0])
        if raw is None:
            raise Unschedulable(
                "credentials_missing",
                f"no {provider.credentials_secret!r} secret for this tenant",
            )
        try:
            credentials = Credentials.parse(raw)
        except CredentialsInvalid as exc:
            raise Unschedulable(
                "credentials_invalid",
                f"{provider.credentials_secret!r} secret is unusable: {exc}",
            ) from None

        def resolve(name: str, fallback: str | None) -> str | None:
            value = found.get((tenant, name)) or found.get((APP, name))
            return value.decode() if value else fallback

        client_id = resolve(provider.client_id_secret, provider.client_id)
        client_secret = resolve(provider.client_secret_secret, provider.client_secret)
        if not client_id or not client_secret:
            raise Unschedulable(
                "client_credentials_missing",
                "no client id or secret: neither tenant nor app secrets "
                f"{provider.client_id_secret!r}/{provider.client_secret_secret!r} "
                "nor the provider config give one",
            )
        return Secrets(credentials, client_id, client_secret)

    async def _unschedulable(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        error: Unschedulable,
        work: _Work,
        outcome: oauth.Outcome | None = None,
    ) -> None:
        recorded = (current.last_refresh_failure or {}).get("code")
        if current.status == "unschedulable" and recorded == error.code:
            # Recorded once: a notification that changes nothing adds no
            # event, no metric and no log line.
            return
        now = time.time()
        failure = Failure(
            error.code,
            error.message,
            False,
            outcome.http_status if outcome else None,
            now,
        )
        lifecycle = current.replace(
            status="unschedulable",
            schedule_nonce=current.schedule_nonce + 1,
            next_refresh_at=None,
            # Only an attempt that the provider refused counts as a failure.
            consecutive_failures=current.consecutive_failures + bool(outcome),
            last_refresh_failure=failure.to_json(),
            owner_id=self.config.instance_id,
        )
        events = [self._event(FAILED, row, current.expires_at, outcome, error=error)]
        label = "client_rejected" if outcome else "unschedulable"
        await self._commit(conn, row, lifecycle, events, label, work)
        if error.code == NOT_CONFIGURED:
            # _commit keeps the lifecycle only if the row was written.
            work.unconfigured = work.lifecycle is lifecycle
            self._report_unconfigured(row)
        elif self._reported.get(row.key) != error.code:
            self._reported[row.key] = error.code
            logger.warning(
                "integration unschedulable",
                extra=row.key.log(
                    provider=row.provider, code=error.code, reason=error.message
                ),
            )

    def _report_unconfigured(self, row: Row) -> None:
        if row.provider in self._unconfigured:
            return
        self._unconfigured.add(row.provider)
        logger.warning(
            "integrations of a provider that is not configured are not refreshed",
            extra=row.key.log(provider=row.provider[:64]),
        )

    async def _store_failed(
        self,
        conn: Conn,
        row: Row,
        current: Lifecycle,
        error: SecretUnavailable,
        work: _Work,
    ) -> None:
        """The secret store cannot answer now: wait with backoff and alert,
        as for a provider's transient failure."""
        metrics.secret_store_errors.labels(self.secrets.backend, error.code).inc()
        outcome = oauth.Outcome("transient", error.code, str(error))
        await self._retry(conn, row, current, current.expires_at, outcome, work)

    def _deadline(self, expires_at: float, now: float) -> float:
        return policy.deadline(expires_at, now, self.config.scheduler, self.rng)

    def _scheduled(
        self, current: Lifecycle, expires_at: float, now: float, source: str
    ) -> Lifecycle:
        return current.replace(
            status="scheduled",
            schedule_nonce=current.schedule_nonce + 1,
            expires_at=expires_at,
            next_refresh_at=self._deadline(expires_at, now),
            last_scheduled_at=now,
            last_schedule_source=source,
            consecutive_failures=0,
            last_refresh_failure=None,
            reconnect_required=False,
            reconnect_reason=None,
            owner_id=self.config.instance_id,
        )

    def _failure(self, outcome: oauth.Outcome, now: float) -> Failure:
        return Failure(
            outcome.code, outcome.message, outcome.retryable, outcome.http_status, now
        )

    def _event(
        self,
        kind: str,
        row: Row,
        expires_at: float | None,
        outcome: oauth.Outcome | None = None,
        error: Unschedulable | None = None,
    ) -> Event:
        code = error.code if error else (outcome.code if outcome else None)
        message = error.message if error else (outcome.message if outcome else None)
        return Event(
            type=kind,
            key=row.key,
            provider=row.provider,
            expires_at=expires_at,
            retryable=outcome.retryable
            if outcome and not error
            else (False if error else None),
            error_code=code,
            error_message=message,
        )

    async def _commit(
        self,
        conn: Conn,
        row: Row,
        lifecycle: Lifecycle,
        events: list[Event],
        outcome: str | None,
        work: _Work,
        *,
        keep_mark: bool = False,
    ) -> None:
        """Write the lifecycle and events; the transaction commits on return.

        Every write but the one that notes an orphaned mark clears the
        in-flight mark: it records what became of the request.
        """
        if lifecycle.in_flight is not None and not keep_mark:
            lifecycle = lifecycle.replace(in_flight=None)
        if not await self.store.write_lifecycle(conn, row.key, lifecycle, events):
            return
        work.provider = row.provider
        work.lifecycle = lifecycle
        work.events = tuple(events)
        work.outcome = outcome
        if lifecycle.schedulable:
            self._reported.pop(row.key, None)

    def _apply(self, work: _Work) -> None:
        """After commit: count events and move the heap."""
        for event in work.events:
            metrics.events_emitted.labels(event.type).inc()
        if work.unconfigured:
            metrics.unconfigured_provider.inc()
        lifecycle = work.lifecycle
        if lifecycle is None:
            return
        if lifecycle.schedulable and lifecycle.next_refresh_at is not None:
            self.schedule.put(
                work.key,
                lifecycle.next_refresh_at,
                lifecycle.schedule_nonce,
                work.provider,
            )
        else:
            self.schedule.drop(work.key, lifecycle.schedule_nonce)
