"""What a reload changes, in-process: the split between settings applied at
once and those that need a restart, concurrency and rate limits, and how
deadlines follow the policy at a reload and at the start of a term."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    World,
    eventually,
    make_config,
    running,
)
from tokend.fake_endpoint import FakeTokenEndpoint
from tokend.lifecycle import iso
from tokend.reload import changed_keys, split_reload

pytestmark = pytest.mark.anyio


def test_settings_bound_at_start_keep_their_running_values() -> None:
    old = make_config("postgresql://a@127.0.0.1/one")
    new = make_config(
        "postgresql://b:hunter2@127.0.0.1/two",
        scheduler={"buffer_s": 60.0, "concurrency": 3},
        http={"listen": "127.0.0.1:9999"},
        leader={"lock_name": "other"},
        daemon={"instance_id": "renamed", "shutdown_grace_s": 9.0},
        providers={"ninjaone": {"allow_http_loopback": True, "rate_per_s": 2.0}},
    )

    applied, restart = split_reload(old, new)

    assert sorted(restart) == [
        "daemon.instance_id",
        "database.dsn",
        "http.listen",
        "leader.lock_name",
    ]
    assert applied.database == old.database
    assert applied.http == old.http
    assert applied.leader == old.leader
    assert applied.daemon.instance_id == old.daemon.instance_id
    assert applied.daemon.shutdown_grace_s == 9.0
    assert applied.scheduler == new.scheduler
    assert applied.providers == new.providers
    assert changed_keys(old, applied) == [
        "scheduler.buffer_s",
        "scheduler.concurrency",
        "daemon.shutdown_grace_s",
        "providers.ninjaone",
    ]
    assert "hunter2" not in repr((restart, changed_keys(old, new)))


class CountingEndpoint(FakeTokenEndpoint):
    """The fake endpoint, counting the requests it serves at once."""

    active = 0
    peak = 0

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super()._token(request)
        finally:
            self.active -= 1


@pytest.fixture
async def counting(dsn: str) -> AsyncIterator[tuple[World, CountingEndpoint]]:
    endpoint = CountingEndpoint({CLIENT_ID: CLIENT_SECRET}, expires_in_s=7200)
    await endpoint.start()
    try:
        async with World.open(dsn, endpoint) as world:
            yield world, endpoint
    finally:
        await endpoint.stop()


async def test_concurrency_and_rate_limits_change_at_once(
    counting: tuple[World, CountingEndpoint],
) -> None:
    world, endpoint = counting
    endpoint.delay_s = 0.3
    wide = {"concurrency": 4}
    async with running(world.config(scheduler=wide)) as daemon:
        for _ in range(4):
            await world.connect()
        await eventually(lambda: len(world.refreshes()) == 4)
        assert endpoint.peak > 1

        narrow = world.config(scheduler={"concurrency": 1})
        await daemon.reload(narrow)
        endpoint.peak = 0
        for _ in range(3):
            await world.connect()
        await eventually(lambda: len(world.refreshes()) == 7)
        assert endpoint.peak == 1

        endpoint.delay_s = 0
        slow = world.config(
            scheduler=wide,
            providers={"ninjaone": {"allow_http_loopback": True, "rate_per_s": 2.0}},
        )
        await daemon.reload(slow)
        for _ in range(6):
            await world.connect()
        await eventually(lambda: len(world.refreshes()) == 13, timeout_s=20)
    answered = sorted(entry.at for entry in world.refreshes()[7:])
    # Two a second with a burst of one second: the six starts span 2 s.
    assert answered[-1] - answered[0] >= 1.5


def _scheduled(next_in_s: float, expires_in_s: float = 3600) -> dict[str, Any]:
    now = time.time()
    return {
        "tokenLifecycle": {
            "status": "scheduled",
            "scheduleNonce": 2,
            "expiresAt": iso(now + expires_in_s),
            "nextRefreshAt": iso(now + next_in_s),
        }
    }


def _retrying(next_in_s: float) -> dict[str, Any]:
    doc = _scheduled(next_in_s)
    doc["tokenLifecycle"]["status"] = "retrying"
    return doc


async def test_deadlines_follow_the_policy_at_term_start_and_on_reload(
    world: World,
) -> None:
    late = await world.connect(notify=False, settings=_scheduled(3000))
    early = await world.connect(notify=False, settings=_scheduled(600))
    backoff = await world.connect(notify=False, settings=_retrying(3000))
    config = world.config(scheduler={"buffer_s": 1800.0})

    async with running(config) as daemon:
        now = time.time()

        def due_in(key: Any) -> float:
            entry = daemon.schedule.get(key)
            assert entry is not None
            return entry.deadline - now

        # A stored deadline from an older policy is kept only if earlier.
        assert due_in(late) == pytest.approx(1800, abs=2)
        assert due_in(early) == pytest.approx(600, abs=2)
        assert due_in(backoff) == pytest.approx(3000, abs=2)

        await daemon.reload(world.config(scheduler={"buffer_s": 900.0}))

        assert due_in(late) == pytest.approx(2700, abs=2)
        assert due_in(early) == pytest.approx(2700, abs=2)
        # A retry keeps its backoff: the retry policy set it, not the buffer.
        assert due_in(backoff) == pytest.approx(3000, abs=2)
        assert daemon.last_reload is not None
        assert daemon.last_reload.changed == ("scheduler.buffer_s",)
