"""The main job end to end: a real Postgres, the fake endpoint over HTTP."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.helpers import World, eventually, running
from tokend import metrics
from tokend.lifecycle import iso, parse_iso

pytestmark = pytest.mark.anyio


async def test_connect_schedules_one_refresh_that_rotates_and_reschedules(
    world: World,
) -> None:
    async with running(world.config()) as daemon:
        key = await world.connect()
        scheduled = await eventually(lambda: world.lifecycle(key))
        assert scheduled["status"] == "scheduled"
        assert scheduled["lastScheduleSource"] == "oauth_connected"
        sent = await world.credentials(key)

        await eventually(lambda: bool(world.refreshes()))
        assert len(world.refreshes()) == 1
        rotated = world.refreshes()[0]
        assert rotated.refresh_token == sent.refresh_token

        async def persisted() -> dict | None:
            doc = await world.lifecycle(key)
            source = doc and doc["lastScheduleSource"]
            return doc if source == "proactive_refresh_success" else None

        after = await eventually(persisted)
        stored = await world.credentials(key)
        assert stored.refresh_token == rotated.new_refresh_token
        assert world.endpoint.access_token_valid(stored.access_token)
        assert after["scheduleNonce"] > scheduled["scheduleNonce"]
        assert after["lastRefreshAt"] is not None
        assert parse_iso(after["nextRefreshAt"], "") > time.time() - 1
        assert daemon.schedule.get(key) is not None
        text = orjson.dumps(after).decode()
        for secret in (stored.access_token, stored.refresh_token, sent.refresh_token):
            assert secret not in text
        types = [e["type"] for e in await world.events(key)]
        assert types[0] == "INTEGRATION_TOKEN_REFRESHED"


async def test_disconnected_stops_refreshes_and_connected_resumes(world: World) -> None:
    config = world.config(scheduler={"buffer_s": 3595.0})
    async with running(config) as daemon:
        key = await world.connect()
        await eventually(lambda: key in daemon.schedule)
        await world.conn.execute(
            "UPDATE rmm_integrations SET is_active = false WHERE tenant = $1",
            key.tenant,
        )
        await eventually(lambda: key not in daemon.schedule)
        lifecycle = await world.lifecycle(key)
        assert lifecycle is not None and lifecycle["status"] == "inactive"
        await _sleep(6)
        assert world.refreshes() == []

        await world.conn.execute(
            "UPDATE rmm_integrations SET is_active = true WHERE tenant = $1",
            key.tenant,
        )
        await eventually(lambda: bool(world.refreshes()), timeout_s=10)


async def test_connected_after_reconnect_required_schedules_afresh(
    world: World,
) -> None:
    async with running(world.config()) as daemon:
        key = await world.connect(notify=False, settings=_reconnect_required())
        await world.notify("refreshed", key)
        await _sleep(1)
        assert key not in daemon.schedule

        await world.notify("connected", key)
        lifecycle = await eventually(lambda: _status(world, key, "scheduled"))
        assert lifecycle["reconnectRequired"] is False
        await eventually(lambda: bool(world.refreshes()))


async def test_lazy_refresh_by_host_moves_deadline_without_extra_refresh(
    world: World,
) -> None:
    config = world.config(scheduler={"buffer_s": 3597.0})
    async with running(config) as daemon:
        key = await world.connect()
        before = await eventually(lambda: daemon.schedule.get(key))

        # The host app refreshes lazily, stores the new set, and says so.
        sent = await world.credentials(key)
        status, answer = world.endpoint.rotate(sent.refresh_token, "test-client")
        assert status == 200
        new = sent.__class__(
            answer["access_token"],
            answer["refresh_token"],
            int((time.time() + 7200) * 1000),
            sent.instance_url,
            {},
        )
        await world.secrets.put(key.tenant, "ninjaone_credentials", new.dumps())
        await world.notify("refreshed", key)

        async def moved() -> float | None:
            entry = daemon.schedule.get(key)
            return entry.deadline if entry and entry.nonce > before.nonce else None

        deadline = await eventually(moved)
        assert deadline > time.time() + 3000
        await _sleep(before.deadline - time.time() + 2)
        assert len(world.refreshes()) == 1  # the host app's own, none by tokend
        lifecycle = await world.lifecycle(key)
        assert lifecycle and lifecycle["lastScheduleSource"] == "lazy_refresh_success"


async def test_invalid_grant_marks_reconnect_required_and_stops(world: World) -> None:
    async with running(world.config()) as daemon:
        key = await world.connect(notify=False)
        sent = await world.credentials(key)
        world.endpoint.rotate(sent.refresh_token, "test-client")  # kills it
        await world.notify("connected", key)

        lifecycle = await eventually(lambda: _status(world, key, "reconnect_required"))
        assert lifecycle["reconnectRequired"] is True
        assert lifecycle["lastRefreshFailure"]["code"] == "invalid_grant"
        assert key not in daemon.schedule
        types = [e["type"] for e in await world.events(key)]
        assert types == ["INTEGRATION_RECONNECT_REQUIRED"]
        await _sleep(3)
        assert len(world.refreshes("reused")) == 1


async def test_missing_credentials_mark_unschedulable_once(world: World) -> None:
    async with running(world.config()) as daemon:
        key = await world.connect(credentials=b"")
        lifecycle = await eventually(lambda: _status(world, key, "unschedulable"))
        assert lifecycle["lastRefreshFailure"]["code"] == "credentials_missing"
        nonce = lifecycle["scheduleNonce"]
        await _sleep(3)
        assert key not in daemon.schedule
        again = await world.lifecycle(key)
        assert again and again["scheduleNonce"] == nonce
        failed = [e for e in await world.events(key)]
        assert len(failed) == 1


async def test_credentials_with_an_absurd_expiry_mark_unschedulable(
    world: World,
) -> None:
    creds = b'{"access_token": "a", "refresh_token": "r", "expires_at": 1e17}'
    async with running(world.config()) as daemon:
        key = await world.connect(credentials=creds)
        lifecycle = await eventually(lambda: _status(world, key, "unschedulable"))
        assert lifecycle["lastRefreshFailure"]["code"] == "credentials_invalid"
        assert "expires_at" in lifecycle["lastRefreshFailure"]["message"]
        assert daemon.leader.role == "leader"


async def test_unreadable_credentials_mark_unschedulable(world: World) -> None:
    async with running(world.config()):
        key = await world.connect(credentials=b'{"access_token": 5}')
        lifecycle = await eventually(lambda: _status(world, key, "unschedulable"))
        failure = lifecycle["lastRefreshFailure"]
        assert failure["code"] == "credentials_invalid"
        assert "access_token" in failure["message"]


async def test_rows_without_lifecycle_are_backfilled_at_start(world: World) -> None:
    keys = [await world.connect(notify=False, expires_in_s=3600 + i) for i in range(5)]
    config = world.config(scheduler={"buffer_s": 600.0})
    async with running(config) as daemon:
        for key in keys:
            lifecycle = await eventually(lambda k=key: world.lifecycle(k))
            assert lifecycle["lastScheduleSource"] == "backfill"
            assert lifecycle["status"] == "scheduled"
            expires = (await world.credentials(key)).expires_at
            assert parse_iso(lifecycle["expiresAt"], "") == pytest.approx(
                expires, abs=0.01
            )
            entry = daemon.schedule.get(key)
            assert entry is not None
            assert entry.deadline == pytest.approx(expires - 600, abs=1)


async def test_malformed_notifications_are_counted_and_harmless(world: World) -> None:
    malformed = metrics.notifications.labels("malformed", "malformed")
    unknown_event = metrics.notifications.labels("unknown", "malformed")
    wrong_types = metrics.notifications.labels("connected", "malformed")
    unknown_row = metrics.notifications.labels("connected", "unknown")
    before = [
        c._value.get() for c in (malformed, unknown_event, wrong_types, unknown_row)
    ]
    async with running(world.config()) as daemon:
        for payload in (
            "not json",
            "[1, 2]",
            '{"event": "explode", "tenant": "x"}',
            '{"event": [], "tenant": "x"}',
            '{"event": {}}',
            '{"event": "connected", "tenant": 5, "integration_id": null}',
            '{"event": "connected", "tenant": "00000000-0000-0000-0000-000000000001",'
            ' "integration_id": "00000000-0000-0000-0000-000000000002"}',
        ):
            await world.conn.execute("SELECT pg_notify('tokend', $1)", payload)
        key = await world.connect()
        await eventually(lambda: bool(world.refreshes()))
        assert daemon.leader.role == "leader"
    after = [
        c._value.get() for c in (malformed, unknown_event, wrong_types, unknown_row)
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 3, 1, 1]
    assert key is not None


async def test_instance_url_outside_allow_list_is_refused_before_any_request(
    world: World,
) -> None:
    config = world.config(providers={"ninjaone": {"allow_http_loopback": False}})
    async with running(config):
        key = await world.connect()
        lifecycle = await eventually(lambda: _status(world, key, "unschedulable"))
        assert lifecycle["lastRefreshFailure"]["code"] == "token_url_refused"
        assert world.endpoint.log == []


def _reconnect_required() -> dict:
    return {
        "tokenLifecycle": {
            "status": "reconnect_required",
            "scheduleNonce": 3,
            "reconnectRequired": True,
            "reconnectReason": "refresh token rejected (invalid_grant)",
        }
    }


async def _status(world: World, key, status: str) -> dict | None:  # type: ignore[no-untyped-def]
    lifecycle = await world.lifecycle(key)
    return lifecycle if lifecycle and lifecycle["status"] == status else None


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(max(0.0, seconds))


@pytest.mark.parametrize(
    "damage",
    [
        {"scheduleNonce": "7"},
        {"scheduleNonce": -5},
        {"consecutiveFailures": -1},
        {"status": "Scheduled"},
        {"scheduleNonce": 1e30},
    ],
    ids=[
        "string-nonce",
        "negative-nonce",
        "negative-failures",
        "unknown-status",
        "huge",
    ],
)
async def test_a_damaged_lifecycle_is_replaced_and_the_integration_refreshed(
    world: World, damage: dict
) -> None:
    now = time.time()
    lifecycle = {
        "status": "scheduled",
        "scheduleNonce": 4,
        "expiresAt": iso(now + 3600),
        "nextRefreshAt": iso(now + 1),
        **damage,
    }
    key = await world.connect(notify=False, settings={"tokenLifecycle": lifecycle})
    async with running(world.config()):

        async def healed() -> dict | None:
            doc = await world.lifecycle(key)
            ok = doc and doc.get("lastScheduleSource") == "proactive_refresh_success"
            return doc if ok else None

        after = await eventually(healed)
    assert isinstance(after["scheduleNonce"], int) and after["scheduleNonce"] >= 1
    assert after["status"] == "scheduled" and after["consecutiveFailures"] == 0
