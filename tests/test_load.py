"""The start-of-term load: entries built in SQL match those Python builds,
every kind of row lands where it should, and a time SQL cannot parse costs
one retry, not the load."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson
import pytest

from tests.helpers import World, eventually, running
from tokend.config import SchedulerConfig
from tokend.lifecycle import iso, parse_iso
from tokend.schedule import ENTRY_SQL, Schedule
from tokend.store import IntegrationKey, LoadedBatch, Store

pytestmark = pytest.mark.anyio


async def insert(
    conn: asyncpg.Connection,
    lifecycle: Any,
    *,
    provider: str = "ninjaone",
    active: bool = True,
) -> IntegrationKey:
    key = IntegrationKey(uuid.uuid4(), uuid.uuid4())
    settings = {} if lifecycle is None else {"tokenLifecycle": lifecycle}
    await conn.execute(
        "INSERT INTO rmm_integrations (tenant, integration_id, provider, is_active,"
        " settings) VALUES ($1, $2, $3, $4, $5::jsonb)",
        key.tenant,
        key.integration_id,
        provider,
        active,
        orjson.dumps(settings).decode(),
    )
    return key


def lifecycle(**fields: Any) -> dict[str, Any]:
    doc = {
        "status": "scheduled",
        "scheduleNonce": 3,
        "nextRefreshAt": "2026-12-04T10:00:00.123Z",
        "expiresAt": "2026-12-04T10:15:00.123Z",
        "reconnectRequired": False,
    }
    doc.update(fields)
    return doc


POLICY = SchedulerConfig(buffer_s=900.0, min_delay_s=30.0, spread_s=0.0)


async def load(
    dsn: str,
    store: Store,
    schedule: Schedule,
    now: float | None = None,
    in_sql: bool = True,
) -> list[LoadedBatch]:
    batches: list[LoadedBatch] = []
    conn = await asyncpg.connect(dsn)
    try:
        await store.load_active(
            conn,
            ENTRY_SQL,
            schedule.providers,
            batches.append,
            policy=POLICY,
            now=time.time() if now is None else now,
            in_sql=in_sql,
            batch=7,
        )
    finally:
        await conn.close()
    return batches


async def test_sql_built_entries_equal_python_packed_ones(world: World) -> None:
    schedule = Schedule()
    schedule.provider_index("ninjaone")
    schedule.provider_index("other")
    expected = {}
    for i in range(40):
        nonce = [0, 1, 255, 256, 2**31, 2**62 + 5][i % 6]
        when = f"20{27 + i % 50}-0{1 + i % 9}-1{i % 10}T0{i % 10}:3{i % 10}:59.{i:03d}Z"
        provider = "other" if i % 3 else "ninjaone"
        # Without expiresAt the stored deadline stands (no policy's).
        key = await insert(
            world.conn,
            lifecycle(scheduleNonce=nonce, nextRefreshAt=when, expiresAt=None),
            provider=provider,
        )
        deadline = parse_iso(when, "")
        assert deadline is not None
        expected[key] = schedule.pack(key, deadline, nonce, provider)

    batches = await load(world.dsn, Store("rmm_integrations", "e"), schedule)

    entries = [e for b in batches for e in b.entries]
    assert sorted(entries) == sorted(expected.values())
    assert not [r for b in batches for r in b.rows]
    schedule.load(entries, {})
    for key, entry in expected.items():
        due = schedule.get(key)
        assert due is not None
        assert schedule.pack(due.key, due.deadline, due.nonce, due.provider) == entry


async def test_each_kind_of_row_is_loaded_as_it_must_be(world: World) -> None:
    conn = world.conn
    fast = await insert(conn, lifecycle())
    slow = {
        "no lifecycle": await insert(conn, None),
        "no status": await insert(conn, {"scheduleNonce": 1}),
        "offset time": await insert(
            conn, lifecycle(nextRefreshAt="2026-12-04T12:00:00+02:00")
        ),
        "nonce as text": await insert(conn, lifecycle(scheduleNonce="4")),
        "negative nonce": await insert(conn, lifecycle(scheduleNonce=-1)),
        "fractional nonce": await insert(conn, lifecycle(scheduleNonce=1.5)),
        "unknown provider": await insert(conn, lifecycle(), provider="elsewhere"),
        "lifecycle a string": await insert(conn, "garbage"),
    }
    no_nonce = await insert(
        conn, {"status": "retrying", "nextRefreshAt": "2026-12-04T10:00:00Z"}
    )
    # No stored deadline: the policy's, from expiresAt, in SQL too.
    no_deadline = await insert(conn, lifecycle(nextRefreshAt=None))
    skipped = [
        await insert(conn, lifecycle(status="reconnect_required")),
        await insert(conn, lifecycle(reconnectRequired=True)),
        await insert(conn, lifecycle(status="unschedulable")),
        await insert(conn, lifecycle(status="inactive")),
    ]
    await insert(conn, lifecycle(), active=False)
    schedule = Schedule()
    schedule.provider_index("ninjaone")

    now = time.time()
    batches = await load(world.dsn, Store("rmm_integrations", "e"), schedule, now)

    schedule.load([e for b in batches for e in b.entries], {})
    assert {d.key for d in schedule.upcoming(100)} == {fast, no_nonce, no_deadline}
    no_nonce_due = schedule.get(no_nonce)
    assert no_nonce_due is not None and no_nonce_due.nonce == 0
    by_policy = schedule.get(no_deadline)
    # expiresAt has passed: the least delay from now (spread 0 here).
    assert by_policy is not None
    assert by_policy.deadline == pytest.approx(now + 30, abs=0.002)
    rows = {r.key: r for b in batches for r in b.rows}
    assert set(rows) == set(slow.values())
    assert rows[slow["unknown provider"]].provider == "elsewhere"
    assert rows[slow["offset time"]].next_refresh_at == "2026-12-04T12:00:00+02:00"
    assert rows[slow["offset time"]].expires_at == "2026-12-04T10:15:00.123Z"
    assert rows[slow["nonce as text"]].nonce == "4"
    assert not any(k in rows or k in schedule for k in skipped)
    assert rows[slow["no status"]].status is None


async def test_the_daemon_loads_every_kind(world: World) -> None:
    fast = await world.connect(
        notify=False,
        settings={
            "tokenLifecycle": lifecycle(
                nextRefreshAt="2099-01-01T00:00:00.000Z", expiresAt=None
            )
        },
    )
    offset = await world.connect(
        notify=False,
        settings={
            "tokenLifecycle": lifecycle(
                nextRefreshAt="2099-01-01T02:00:00+02:00", expiresAt=None
            )
        },
    )
    backfilled = await world.connect(notify=False)
    gone = await world.connect(
        notify=False,
        settings={"tokenLifecycle": lifecycle(status="reconnect_required")},
    )
    async with running(world.config()) as daemon:
        assert daemon.store.validate_times is False
        for key in (fast, offset):
            due = daemon.schedule.get(key)
            assert due is not None and due.deadline == 4070908800.0
        assert await eventually(lambda: daemon.schedule.get(backfilled))
        assert gone not in daemon.schedule
        # Counted after the backfill: the row without a lifecycle has one.
        assert daemon.status_counts == {"scheduled": 3, "reconnect_required": 1}


async def test_a_time_sql_cannot_parse_costs_a_retry_not_the_load(world: World) -> None:
    good = await world.connect(
        notify=False,
        settings={
            "tokenLifecycle": lifecycle(
                nextRefreshAt="2099-01-01T00:00:00.000Z", expiresAt=None
            )
        },
    )
    bad = await world.connect(
        notify=False,
        settings={
            "tokenLifecycle": lifecycle(
                nextRefreshAt="2099-02-30T00:00:00.000Z", expiresAt=None
            )
        },
    )
    async with running(world.config()) as daemon:
        assert daemon.store.validate_times is True
        assert daemon.schedule.get(good) is not None
        # Python cannot parse it either: the row is backfilled from its
        # credentials, as any row without a usable lifecycle.
        assert await eventually(lambda: _source(world, bad)) == "backfill"
        assert daemon.schedule.get(bad) is not None


async def _source(world: World, key: IntegrationKey) -> str | None:
    doc = await world.lifecycle(key)
    return doc.get("lastScheduleSource") if doc else None


async def test_a_resync_drops_rows_gone_quietly_and_follows_new_nonces(
    world: World,
) -> None:
    keys = [
        await world.connect(
            notify=False,
            settings={
                "tokenLifecycle": lifecycle(
                    nextRefreshAt="2099-01-01T00:00:00.000Z", expiresAt=None
                )
            },
        )
        for _ in range(3)
    ]
    async with running(world.config()) as daemon:
        assert all(k in daemon.schedule for k in keys)
        # Gone without a word: no trigger fires, no notification comes.
        await world.conn.execute(
            "DELETE FROM rmm_integrations WHERE tenant = $1", keys[0].tenant
        )
        moved = lifecycle(
            scheduleNonce=9, nextRefreshAt="2099-06-01T00:00:00.000Z", expiresAt=None
        )
        await world.conn.execute(
            "UPDATE rmm_integrations SET settings = $2::jsonb WHERE tenant = $1",
            keys[1].tenant,
            orjson.dumps({"tokenLifecycle": moved}).decode(),
        )
        await daemon.resync()
        assert keys[0] not in daemon.schedule
        due = daemon.schedule.get(keys[1])
        assert due is not None and due.nonce == 9
        assert due.deadline == parse_iso("2099-06-01T00:00:00Z", "")
        assert keys[2] in daemon.schedule


async def test_a_scheduled_row_takes_the_policy_deadline_if_earlier(
    world: World,
) -> None:
    now = 1_900_000_000.0
    stored, expires = iso(now + 5000), iso(now + 3600)
    earlier = await insert(
        world.conn, lifecycle(nextRefreshAt=stored, expiresAt=expires)
    )
    retrying = await insert(
        world.conn,
        lifecycle(status="retrying", nextRefreshAt=stored, expiresAt=expires),
    )
    soon = await insert(
        world.conn, lifecycle(nextRefreshAt=iso(now + 60), expiresAt=expires)
    )
    lapsed = await insert(
        world.conn, lifecycle(nextRefreshAt=stored, expiresAt=iso(now - 10))
    )
    schedule = Schedule()
    schedule.provider_index("ninjaone")

    batches = await load(world.dsn, Store("rmm_integrations", "e"), schedule, now)

    schedule.load([e for b in batches for e in b.entries], {})
    deadlines = {
        k: due.deadline
        for k in (earlier, retrying, soon, lapsed)
        if (due := schedule.get(k)) is not None
    }
    assert deadlines == {
        earlier: now + 3600 - 900,  # the policy's, earlier than the stored
        retrying: now + 5000,  # a retry keeps its backoff
        soon: now + 60,  # the stored, earlier than the policy's
        lapsed: now + 30,  # never sooner than the least delay
    }

    recomputed = await load(
        world.dsn, Store("rmm_integrations", "e"), Schedule(), now, in_sql=False
    )
    assert not [e for b in recomputed for e in b.entries]
    assert len([r for b in recomputed for r in b.rows]) == 4
