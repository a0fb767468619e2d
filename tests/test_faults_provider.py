"""Provider faults in a mix (5xx, 429, timeouts, resets, garbage) for a
while: every integration ends healthy once the provider recovers."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from tests.faults import spawn
from tests.helpers import World, eventually
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio


async def _healthy(world: World, key: IntegrationKey) -> bool:
    lifecycle = await world.lifecycle(key)
    if lifecycle is None or lifecycle["status"] != "scheduled":
        return False
    stored = (await world.credentials(key)).refresh_token
    return lifecycle["consecutiveFailures"] == 0 and world.endpoint.is_current(stored)


async def test_a_mix_of_provider_faults_ends_with_every_integration_healthy(
    world: World, tmp_path: Path
) -> None:
    world.endpoint.reuse_detection = True
    a = spawn(
        tmp_path,
        world.dsn,
        "a",
        retry={"initial_s": 0.5, "max_s": 2.0, "expiring_warning_s": 0.0},
        providers={"ninjaone": {"allow_http_loopback": True, "request_timeout_s": 1.0}},
    ).start()
    try:
        keys = [await world.connect() for _ in range(20)]
        await eventually(lambda: len(world.refreshes()) >= 20, timeout_s=20)
        world.endpoint.fault_rate = 0.6
        await anyio.sleep(15)
        world.endpoint.fault_rate = 0.0

        async def all_healthy() -> bool:
            return all([await _healthy(world, key) for key in keys])

        await eventually(all_healthy, timeout_s=30)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        assert all([await _healthy(world, key) for key in keys])
        types = {e["type"] for e in await world.events()}
        assert {
            "INTEGRATION_TOKEN_REFRESH_FAILED",
            "INTEGRATION_TOKEN_RECOVERED",
        } <= types
        assert "INTEGRATION_RECONNECT_REQUIRED" not in types
        assert world.refreshes("reused") == []
    finally:
        a.stop()
