"""The host table and the events outbox: every statement tokend runs on them.

tokend writes only `settings.tokenLifecycle` (with jsonb_set, never a
read-merge-write of the whole settings: the host app edits other keys
concurrently) and `updated_at`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import anyio
import orjson

from tokend.config import SchedulerConfig
from tokend.db import Conn, LockedTransaction
from tokend.keys import integration_key
from tokend.lifecycle import (
    SCHEDULABLE,
    STATUSES,
    Lifecycle,
    LifecycleInvalid,
    iso,
    safe_message,
)

logger = logging.getLogger(__name__)


class IntegrationKey(NamedTuple):
    tenant: UUID
    integration_id: UUID

    @property
    def lock_key(self) -> int:
        return integration_key(self.tenant, self.integration_id)

    def log(self, **more: Any) -> dict[str, Any]:
        """Context fields for a log line about this integration."""
        return {
            "tenant": str(self.tenant),
            "integration_id": str(self.integration_id),
            **more,
        }


@dataclass(frozen=True)
class Row:
    key: IntegrationKey
    provider: str
    instance_url: str | None
    is_active: bool
    lifecycle: Lifecycle | None
    lifecycle_error: str | None = None


MAX_INT8 = (1 << 63) - 1
# Known statuses that keep an integration out of the schedule; an unknown one
# is a damaged lifecycle, scheduled so that its refresh writes a new one.
_UNSCHEDULED_SQL = ", ".join(
    f"'{status}'" for status in sorted(set(STATUSES) - SCHEDULABLE)
)


class LoadedRow(NamedTuple):
    """A row of the start-of-term load that Python must judge."""

    key: IntegrationKey
    provider: str
    status: str | None
    nonce: str | None
    next_refresh_at: str | None
    expires_at: str | None


class LoadedBatch(NamedTuple):
    entries: list[int]
    rows: list[LoadedRow]


def _loaded(rows: list[Any]) -> LoadedBatch:
    from_bytes = int.from_bytes
    return LoadedBatch(
        [from_bytes(r[0], "big") for r in rows if r[0] is not None],
        [
            LoadedRow(IntegrationKey(r[1], r[2]), *r[3:])
            for r in rows
            if r[1] is not None
        ],
    )


@dataclass(frozen=True)
class Event:
    type: str
    key: IntegrationKey
    provider: str
    expires_at: float | None = None
    retryable: bool | None = None
    error_code: str | None = None
    error_message: str | None = None

    def payload(self, at: float) -> dict[str, Any]:
        return {
            "type": self.type,
            "tenant": str(self.key.tenant),
            "integration_id": str(self.key.integration_id),
            "provider": self.provider,
            "at": iso(at),
            "expires_at": iso(self.expires_at),
            "retryable": self.retryable,
            "error_code": self.error_code,
            "error_message": None
            if self.error_message is None
            else safe_message(self.error_message),
        }


class IntegrationStats(NamedTuple):
    """Active integrations by lifecycle status, and how many of those still
    scheduled hold an access token past its expiry."""

    counts: dict[str, int]
    expired: int


class Listed(NamedTuple):
    """One integration as `tokend status` lists it: the lifecycle's text."""

    key: IntegrationKey
    provider: str
    status: str | None
    next_refresh_at: str | None
    expires_at: str | None
    reason: str | None
    failure_code: str | None
    failed_at: str | None


class Store:
    def __init__(self, table: str, events_channel: str) -> None:
        # The table name is a validated identifier (config), safe to format in.
        self.table = table
        self.events_channel = events_channel
        # Parameters: $1 the providers (an entry holds an index into them),
        # $2 now, $3 the buffer, $4 the least delay, $5 the spread (all ms).
        self._load = f"""
            SELECT CASE WHEN fast THEN <entry> END,
                   CASE WHEN slow THEN tenant END,
                   CASE WHEN slow THEN integration_id END,
                   CASE WHEN slow THEN provider END,
                   CASE WHEN slow THEN status END,
                   CASE WHEN slow THEN l ->> 'scheduleNonce' END,
                   CASE WHEN slow THEN next_text END,
                   CASE WHEN slow THEN expires_text END
            FROM (
                SELECT *, NOT skip AND NOT fast AS slow
                FROM (
                    SELECT *,
                        coalesce(<in_sql> AND NOT skip AND status IS NOT NULL
                                 AND nonce IS NOT NULL AND provider_index IS NOT NULL
                                 AND next_ok AND expires_ok
                                 AND deadline_ms IS NOT NULL, false) AS fast
                    FROM (
                        -- As policy.deadline, the earlier of the stored one
                        -- and the policy's (Daemon._load_row says why).
                        SELECT *, round(least(stored_ms,
                            CASE WHEN status = 'scheduled' AND expires_ms IS NOT NULL
                                 THEN greatest($2::float8,
                                     greatest(expires_ms - $3::float8,
                                              $2::float8 + $4::float8)
                                     - random() * $5::float8) END))::int8
                            AS deadline_ms
                        FROM (
                            SELECT *,
                                status IS NOT NULL AND (
                                    status IN ({_UNSCHEDULED_SQL})
                                    OR coalesce(reconnect = 'true', false)
                                ) AS skip,
                                CASE WHEN NOT has_nonce THEN 0
                                     WHEN n BETWEEN 0 AND {MAX_INT8}
                                          AND scale(n) = 0
                                     THEN n::int8 END AS nonce,
                                next_text IS NULL OR (<valid:next_text>) AS next_ok,
                                expires_text IS NULL OR (<valid:expires_text>)
                                    AS expires_ok,
                                CASE WHEN <valid:next_text> THEN greatest(0, 1000
                                    * date_part('epoch', next_text::timestamptz))
                                END AS stored_ms,
                                CASE WHEN <valid:expires_text> THEN 1000 * date_part(
                                    'epoch', expires_text::timestamptz) END
                                    AS expires_ms,
                                (array_position($1::text[], provider) - 1)::int2
                                    AS provider_index
                            FROM (
                                SELECT tenant, integration_id, provider, l,
                                       l ->> 'status' AS status,
                                       l ? 'scheduleNonce' AS has_nonce,
                                       CASE WHEN jsonb_typeof(l -> 'scheduleNonce')
                                                 = 'number'
                                            THEN (l -> 'scheduleNonce')::numeric
                                       END AS n,
                                       l ->> 'nextRefreshAt' AS next_text,
                                       l ->> 'expiresAt' AS expires_text,
                                       l ->> 'reconnectRequired' AS reconnect
                                FROM (
                                    SELECT tenant, integration_id, provider,
                                           settings -> 'tokenLifecycle' AS l
                                    FROM {table} WHERE is_active
                                ) AS active
                                -- Fences: each expression is computed once.
                                OFFSET 0
                            ) AS fields
                            OFFSET 0
                        ) AS parsed
                        OFFSET 0
                    ) AS planned
                ) AS judged
            ) AS sorted"""
        # Until a timestamp has failed SQL's cast, trust the cast (cheapest).
        self.validate_times = False
        self._read = f"""
            SELECT provider, instance_url, is_active,
                   settings -> 'tokenLifecycle' AS lifecycle
            FROM {table} WHERE tenant = $1 AND integration_id = $2"""
        self._write = f"""
            UPDATE {table}
            SET settings = jsonb_set(coalesce(settings, '{{}}'), '{{tokenLifecycle}}',
                                     $3::jsonb),
                updated_at = now()
            WHERE tenant = $1 AND integration_id = $2
              AND jsonb_typeof(coalesce(settings, '{{}}')) = 'object'"""
        # tokend writes every timestamp as ISO-8601 UTC with milliseconds, so
        # text order is time order and a malformed value cannot fail the query.
        self._stats = f"""
            SELECT coalesce(settings #>> '{{tokenLifecycle,status}}', 'none'),
                   count(*),
                   count(*) FILTER (
                       WHERE settings #>> '{{tokenLifecycle,status}}'
                             IN ('scheduled', 'refreshing', 'retrying')
                         AND settings #>> '{{tokenLifecycle,expiresAt}}' < $1)
            FROM {table} WHERE is_active GROUP BY 1"""
        self._stranded = f"""
            SELECT tenant, integration_id FROM {table}
            WHERE is_active AND provider = ANY($1::text[])
              AND settings #>> '{{tokenLifecycle,status}}' = 'unschedulable'
              AND settings #>> '{{tokenLifecycle,lastRefreshFailure,code}}'
                  = ANY($2::text[])"""
        listed = f"""
            SELECT tenant, integration_id, provider,
                   settings #>> '{{tokenLifecycle,status}}',
                   settings #>> '{{tokenLifecycle,nextRefreshAt}}',
                   settings #>> '{{tokenLifecycle,expiresAt}}',
                   coalesce(
                       settings #>> '{{tokenLifecycle,reconnectReason}}',
                       settings #>> '{{tokenLifecycle,lastRefreshFailure,message}}'
                   ),
                   settings #>> '{{tokenLifecycle,lastRefreshFailure,code}}',
                   settings #>> '{{tokenLifecycle,lastRefreshFailure,failedAt}}'
            FROM {table} WHERE is_active"""
        self._upcoming = f"""{listed}
              AND settings #>> '{{tokenLifecycle,status}}'
                  IN ('scheduled', 'refreshing', 'retrying')
              AND settings #>> '{{tokenLifecycle,nextRefreshAt}}' IS NOT NULL
            ORDER BY 5 LIMIT $1"""
        self._attention = f"""{listed}
              AND settings #>> '{{tokenLifecycle,status}}'
                  IN ('reconnect_required', 'unschedulable')
            ORDER BY 4, 9 DESC NULLS LAST LIMIT $1"""
        # The lifecycle, the events' outbox rows and their NOTIFYs in one
        # statement; events only if the lifecycle was written.
        self._write_with_events = f"""
            WITH written AS ({self._write} RETURNING 1),
            events AS (
                INSERT INTO tokend_events
                    (type, tenant, integration_id, provider, payload)
                SELECT e.type, $1, $2, $4, e.payload::jsonb
                FROM written,
                     unnest($5::text[], $6::text[]) WITH ORDINALITY
                         AS e(type, payload, n)
                ORDER BY e.n
                RETURNING id, payload
            )
            SELECT (SELECT count(*) FROM written),
                   (SELECT count(pg_notify($7, payload::text))
                    FROM (SELECT payload FROM events ORDER BY id) AS sent)"""

    async def load_active(
        self,
        conn: Conn,
        entry_sql: str,
        providers: Sequence[str],
        consume: Callable[[LoadedBatch], None],
        *,
        policy: SchedulerConfig,
        now: float,
        in_sql: bool = True,
        batch: int = 10000,
    ) -> None:
        """Stream every active integration that may be scheduled to
        `consume` in batches; reads no secrets.

        Rows SQL can judge arrive as schedule entries built by `entry_sql`
        (over `deadline_ms`, `nonce` and `provider_index`, the index in
        `providers`), so no Python object is made of their fields; the rest
        (no lifecycle, a time only Python can parse, a provider not listed,
        or all with `in_sql` false) arrive as LoadedRow. Rows that must not
        be scheduled do not arrive.
        """
        # Times in UTC ('Z', as tokend writes them) are parsed by SQL, the
        # rest by Python (to SQL a time without zone is in the session's).
        # A row SQL cannot parse fails the load with a DataError; the
        # caller then sets `validate_times` and loads again, checking each
        # with pg_input_is_valid (Postgres 16), or leaving all to Python.
        check = (
            " AND pg_input_is_valid({0}, 'timestamptz')"
            if conn.get_server_version() >= (16, 0)
            else " AND false"
        )
        query = self._load.replace("<entry>", entry_sql)
        query = query.replace("<in_sql>", "true" if in_sql else "false")
        for column in ("next_text", "expires_text"):
            valid = f"{column} LIKE '____-__-__T%Z'"
            if self.validate_times:
                valid += check.format(column)
            query = query.replace(f"<valid:{column}>", valid)
        args = [
            1000 * now,
            1000 * policy.buffer_s,
            1000 * policy.min_delay_s,
            1000 * policy.spread_s,
        ]
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(query, list(providers), *args)
            send, receive = anyio.create_memory_object_stream[list[Any]](1)

            async def fetch() -> None:
                # Ask for the next batch before the last one is consumed: the
                # server computes it while Python turns the last into entries.
                async with send:
                    while rows := await cursor.fetch(batch):
                        await send.send(rows)

            try:
                async with anyio.create_task_group() as tg, receive:
                    tg.start_soon(fetch)
                    async for rows in receive:
                        consume(_loaded(rows))
            except ExceptionGroup as group:
                # Callers handle the database's error itself (a DataError).
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from group
                raise

    async def stats(self, conn: Conn, now: float) -> IntegrationStats:
        """Active integrations by status ('none' before backfill), and the
        scheduled ones whose access token expired before `now`."""
        rows = await conn.fetch(self._stats, iso(now))
        counts = {status: n for status, n, _ in rows}
        return IntegrationStats(counts, sum(expired for *_, expired in rows))

    async def stranded(
        self, conn: Conn, providers: list[str], codes: list[str]
    ) -> list[IntegrationKey]:
        """Unschedulable integrations of `providers` whose last failure code
        is one of `codes` (failures a config change can cure)."""
        rows = await conn.fetch(self._stranded, providers, codes)
        return [IntegrationKey(r[0], r[1]) for r in rows]

    async def upcoming(self, conn: Conn, limit: int) -> list[Listed]:
        """The scheduled integrations with the earliest stored deadlines."""
        rows = await conn.fetch(self._upcoming, limit)
        return [Listed(IntegrationKey(r[0], r[1]), *r[2:]) for r in rows]

    async def attention(self, conn: Conn, limit: int) -> list[Listed]:
        """Integrations a human must act on: reconnect-required, then
        unschedulable, the latest failures first."""
        rows = await conn.fetch(self._attention, limit)
        return [Listed(IntegrationKey(r[0], r[1]), *r[2:]) for r in rows]

    async def read(self, conn: Conn, key: IntegrationKey) -> Row | None:
        record = await conn.fetchrow(self._read, key.tenant, key.integration_id)
        if record is None:
            return None
        lifecycle, error = None, None
        if record["lifecycle"] is not None:
            try:
                lifecycle = Lifecycle.from_json(orjson.loads(record["lifecycle"]))
            except LifecycleInvalid as exc:
                error = str(exc)
        return Row(
            key,
            record["provider"],
            record["instance_url"],
            record["is_active"],
            lifecycle,
            error,
        )

    def locked(self, conn: Conn, key: IntegrationKey) -> LockedTransaction:
        """A transaction holding the integration's advisory lock (the one the
        host app takes for its lazy refresh) from its first statement."""
        return LockedTransaction(conn, key.lock_key)

    async def write_lifecycle(
        self,
        conn: Conn,
        key: IntegrationKey,
        lifecycle: Lifecycle,
        events: Sequence[Event] = (),
    ) -> bool:
        """Store the lifecycle and emit `events` (outbox row plus NOTIFY, in
        order), in one statement taking effect at the caller's commit, so the
        caller counts events in metrics only after committing. False, and
        no events, if the row is gone or its settings are not a JSON object
        (the host's data is then left as it is)."""
        doc = orjson.dumps(lifecycle.to_json()).decode()
        if events:
            at = time.time()
            written = await conn.fetchval(
                self._write_with_events,
                key.tenant,
                key.integration_id,
                doc,
                events[0].provider,
                [event.type for event in events],
                [orjson.dumps(event.payload(at)).decode() for event in events],
                self.events_channel,
            )
        else:
            status = await conn.execute(
                self._write, key.tenant, key.integration_id, doc
            )
            written = 1 if status == "UPDATE 1" else 0
        if written == 1:
            return True
        logger.error(
            "lifecycle not written: row missing or settings not a JSON object",
            extra=key.log(),
        )
        return False
