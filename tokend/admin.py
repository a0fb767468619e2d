"""Operator commands that work through the database: `tokend status`,
`notify`, `reset` and `refresh`.

`status` reads what the leader wrote (the lifecycles and the leader lock), so
it works from any host that reaches Postgres. The others send the leader a
notification, as the host app does; `reset` and `refresh` then watch the
integration's lifecycle until the leader has acted, so the operator learns
the outcome rather than a hope.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import asyncpg
import orjson

from tokend.config import Config
from tokend.db import connect
from tokend.errors import DatabaseError, TokendError
from tokend.keys import leader_key
from tokend.lifecycle import Lifecycle, iso
from tokend.listener import EVENTS
from tokend.store import IntegrationKey, Listed, Row, Store

T = TypeVar("T")

# How often a waiting command looks at the lifecycle again.
POLL_S = 0.2

_LEADER = """
SELECT a.pid, a.client_addr::text AS client, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1
"""


class CommandFailed(TokendError):
    """The command ran, and what it asked for did not happen."""


async def _with_connection(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    conn = await connect(config, "tokend-cli")
    try:
        return await work(conn)
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        raise DatabaseError(f"database error: {exc}") from exc
    finally:
        with anyio.move_on_after(5, shield=True):
            await conn.close()


def _store(config: Config) -> Store:
    return Store(config.database.integrations_table, config.notify.events_channel)


async def _leader(conn: Any, config: Config) -> dict[str, Any] | None:
    key = leader_key(config.leader.lock_name)
    row = await conn.fetchrow(_LEADER, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
    if row is None:
        return None
    return {"pid": row["pid"], "client": row["client"], "since": row["backend_start"]}


# -- status ---------------------------------------------------------------


async def status(config: Config, limit: int) -> dict[str, Any]:
    """Integrations by status, the next deadlines and what needs a human."""
    store = _store(config)

    async def read(conn: Any) -> dict[str, Any]:
        stats = await store.stats(conn, time.time())
        leader = await _leader(conn, config)
        return {
            "leader": None
            if leader is None
            else {**leader, "since": leader["since"].isoformat()},
            "counts": stats.counts,
            "tokens_expired": stats.expired,
            "next": [_listed(i) for i in await store.upcoming(conn, limit)],
            "attention": [_listed(i) for i in await store.attention(conn, limit)],
        }

    return await _with_connection(config, read)


def _listed(item: Listed) -> dict[str, Any]:
    return {
        "tenant": str(item.key.tenant),
        "integration_id": str(item.key.integration_id),
        "provider": item.provider,
        "status": item.status,
        "next_refresh_at": item.next_refresh_at,
        "expires_at": item.expires_at,
        "reason": item.reason,
        "failure_code": item.failure_code,
        "failed_at": item.failed_at,
    }


def render_status(doc: dict[str, Any]) -> str:
    """`tokend status` for a terminal."""
    leader = doc["leader"]
    lines = [
        "leader: "
        + (
            "none (no tokend process holds the leader lock)"
            if leader is None
            else f"backend pid {leader['pid']} from {leader['client'] or 'local'}"
        )
    ]
    counts = doc["counts"]
    total = sum(counts.values())
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines.append(f"integrations: {total} active" + (f" ({by_status})" if total else ""))
    lines.append(f"tokens expired: {doc['tokens_expired']}")
    lines.append("next deadlines:" if doc["next"] else "next deadlines: none")
    lines += [
        f"  {i['next_refresh_at']}  {i['tenant']} {i['integration_id']}"
        f"  {i['provider']} {i['status']}"
        for i in doc["next"]
    ]
    attention = doc["attention"]
    lines.append("needing attention:" if attention else "needing attention: none")
    lines += [
        f"  {i['status']}  {i['tenant']} {i['integration_id']}  {i['provider']}"
        f"  {i['failure_code'] or '-'}: {i['reason'] or '-'}"
        for i in attention
    ]
    return "\n".join(lines)


# -- notifications --------------------------------------------------------


async def notify(config: Config, event: str, key: IntegrationKey | None) -> str:
    """Send one notification to the leader; refuse if nobody would hear it."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")

    async def send(conn: Any) -> str:
        if key is not None:
            await _existing(conn, config, key)
        await _require_leader(conn, config)
        await _send(conn, config, event, key)
        target = "" if key is None else f" for {key.tenant} {key.integration_id}"
        return f"sent {event}{target} on channel {config.notify.channel}"

    return await _with_connection(config, send)


async def reset(config: Config, key: IntegrationKey, wait_s: float) -> str:
    """Clear reconnect-required: the leader reschedules from the stored
    credentials (after the tenant reconnected, or the cause was fixed)."""

    async def act(conn: Any) -> str:
        row = await _existing(conn, config, key)
        before = _lifecycle(row)
        await _require_leader(conn, config)
        await _send(conn, config, "reset", key)
        if wait_s <= 0:
            return f"sent reset for {key.tenant} {key.integration_id}"
        after = await _watch(
            conn,
            config,
            key,
            wait_s,
            lambda lc: lc.schedule_nonce > before.schedule_nonce,
        )
        if after is None:
            raise CommandFailed(
                f"the leader did not act on the reset within {wait_s:g} s"
            )
        if after.status in ("scheduled", "retrying"):
            return (
                f"reset: {key.tenant} {key.integration_id} is {after.status},"
                f" next refresh at {iso(after.next_refresh_at)}"
            )
        raise CommandFailed(f"reset: still {after.status}: {_failure(after)}")

    return await _with_connection(config, act)


async def refresh(config: Config, key: IntegrationKey, wait_s: float) -> str:
    """Ask the leader to refresh now, bypassing any backoff; the leader takes
    one such request a minute per integration."""

    async def act(conn: Any) -> str:
        row = await _existing(conn, config, key)
        before = _lifecycle(row)
        if not row.is_active or before.status == "inactive":
            raise CommandFailed("the integration is inactive: connect it first")
        if before.reconnect_required:
            raise CommandFailed(
                "the integration needs reconnecting (its refresh token was"
                " rejected): reconnect it, then `tokend reset`"
            )
        await _require_leader(conn, config)
        await _send(conn, config, "refresh_now", key)
        if wait_s <= 0:
            return f"sent refresh_now for {key.tenant} {key.integration_id}"

        def attempted(lc: Lifecycle) -> bool:
            # Compared with the stored value, not this host's clock.
            if lc.last_refresh_attempt_at != before.last_refresh_attempt_at:
                return True
            return not lc.schedulable and lc.schedule_nonce > before.schedule_nonce

        after = await _watch(conn, config, key, wait_s, attempted)
        if after is None:
            raise CommandFailed(
                f"no refresh attempt within {wait_s:g} s (the leader takes one"
                " refresh request a minute per integration)"
            )
        if after.status == "scheduled":
            return (
                f"refreshed: the access token now expires at {iso(after.expires_at)},"
                f" next refresh at {iso(after.next_refresh_at)}"
            )
        raise CommandFailed(f"refresh failed, now {after.status}: {_failure(after)}")

    return await _with_connection(config, act)


async def _existing(conn: Any, config: Config, key: IntegrationKey) -> Row:
    row = await _store(config).read(conn, key)
    if row is None:
        table = config.database.integrations_table
        raise CommandFailed(
            f"no integration {key.integration_id} of tenant {key.tenant} in {table}"
        )
    return row


async def _require_leader(conn: Any, config: Config) -> None:
    # Only the leader listens: without one a notification is simply lost.
    if await _leader(conn, config) is None:
        raise CommandFailed(
            f"no tokend leader holds the lock {config.leader.lock_name!r};"
            " nothing would receive the request (is tokend running?)"
        )


async def _send(
    conn: Any, config: Config, event: str, key: IntegrationKey | None
) -> None:
    payload: dict[str, str] = {"event": event}
    if key is not None:
        payload["tenant"] = str(key.tenant)
        payload["integration_id"] = str(key.integration_id)
    await conn.execute(
        "SELECT pg_notify($1, $2)",
        config.notify.channel,
        orjson.dumps(payload).decode(),
    )


def _lifecycle(row: Row) -> Lifecycle:
    return row.lifecycle or Lifecycle()


async def _watch(
    conn: Any,
    config: Config,
    key: IntegrationKey,
    wait_s: float,
    done: Callable[[Lifecycle], bool],
) -> Lifecycle | None:
    """Poll the lifecycle until `done` holds; None if `wait_s` passes."""
    store = _store(config)
    with anyio.move_on_after(wait_s):
        while True:
            row = await store.read(conn, key)
            if row is not None and done(_lifecycle(row)):
                return _lifecycle(row)
            await anyio.sleep(POLL_S)
    return None


def _failure(lifecycle: Lifecycle) -> str:
    failure = lifecycle.last_refresh_failure or {}
    code = failure.get("code") or "-"
    message = failure.get("message") or lifecycle.reconnect_reason or "no details"
    return f"{code}: {message}"
