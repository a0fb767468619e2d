"""The host table and the events outbox: every statement tokend runs on them.

tokend writes only `settings.tokenLifecycle` (with jsonb_set, never a
read-merge-write of the whole settings: the host app edits other keys
concurrently) and `updated_at`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import orjson

from tokend.db import Conn
from tokend.keys import integration_key
from tokend.lifecycle import Lifecycle, LifecycleInvalid, iso, safe_message

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


class LoadedRow(NamedTuple):
    """One row of the start-of-term load: just what the heap needs."""

    key: IntegrationKey
    provider: str
    status: str | None
    nonce: str | None
    next_refresh_at: str | None
    expires_at: str | None
    reconnect_required: str | None


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
        self._load = f"""
            SELECT tenant, integration_id, provider,
                   settings #>> '{{tokenLifecycle,status}}',
                   settings #>> '{{tokenLifecycle,scheduleNonce}}',
                   settings #>> '{{tokenLifecycle,nextRefreshAt}}',
                   settings #>> '{{tokenLifecycle,expiresAt}}',
                   settings #>> '{{tokenLifecycle,reconnectRequired}}'
            FROM {table} WHERE is_active"""
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
        self._emit = """
            WITH e AS (
                INSERT INTO tokend_events
                    (type, tenant, integration_id, provider, payload)
                VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING payload
            )
            SELECT pg_notify($6, (SELECT payload::text FROM e))"""

    async def load_active(
        self, conn: Conn, batch: int = 10000
    ) -> AsyncIterator[list[LoadedRow]]:
        """Stream every active integration in batches; reads no secrets."""
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(self._load)
            while rows := await cursor.fetch(batch):
                yield [LoadedRow(IntegrationKey(r[0], r[1]), *r[2:]) for r in rows]

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

    async def write_lifecycle(
        self, conn: Conn, key: IntegrationKey, lifecycle: Lifecycle
    ) -> bool:
        """Store the lifecycle; False if the row is gone or its settings are
        not a JSON object (the host's data is then left as it is)."""
        doc = orjson.dumps(lifecycle.to_json()).decode()
        status = await conn.execute(self._write, key.tenant, key.integration_id, doc)
        if status == "UPDATE 1":
            return True
        logger.error(
            "lifecycle not written: row missing or settings not a JSON object",
            extra=key.log(),
        )
        return False

    async def emit(self, conn: Conn, event: Event) -> None:
        """Outbox row plus NOTIFY, both taking effect at the caller's commit
        (so the caller counts it in metrics only after committing)."""
        payload = orjson.dumps(event.payload(time.time())).decode()
        await conn.execute(
            self._emit,
            event.type,
            event.key.tenant,
            event.key.integration_id,
            event.provider,
            payload,
            self.events_channel,
        )
