"""The leader's connections cut with pg_terminate_backend, one kind at a time
and all together: it steps down or recovers within the heartbeat bound, the
listener comes back and reloads everything, and no rotated token is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import pytest

from tests.faults import at, backends, said, spawn
from tests.helpers import World, eventually
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio

# The test config: heartbeat every 1 s with a 0.8 s timeout, reconnects
# from 0.1 s. A cut is noticed at once (termination callback) or by the next
# heartbeat; this is the bound for being leader again.
RECOVERY_BOUND_S = 1.0 + 0.8 + 1.0


async def _families(world: World, keys: list[IntegrationKey]) -> dict[str, str]:
    """Each integration's token family at the provider (by integration)."""
    found = {}
    for key in keys:
        token = (await world.credentials(key)).refresh_token
        family = world.endpoint.family_of(token)
        assert family is not None
        found[str(key.integration_id)] = family
    return found


def _refreshed_families(world: World, since: float = 0.0) -> set[str | None]:
    return {e.family for e in world.refreshes() if e.at >= since}


async def test_lock_connection_cut_recovers_and_reloads_everything(
    world: World, tmp_path: Path
) -> None:
    a = spawn(tmp_path, world.dsn, "a").start()
    try:
        await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
        gone = await world.connect()
        (gone_family,) = (await _families(world, [gone])).values()
        await eventually(lambda: gone_family in _refreshed_families(world))

        (pid,) = await backends(world.conn, "tokend-leader")
        cut_at = time.time()
        await world.conn.execute("SELECT pg_terminate_backend($1)", pid)
        # Within two seconds of the cut: ten integrations connect, one goes.
        keys = []
        for _ in range(10):
            keys.append(await world.connect())
            await anyio.sleep(0.12)
        await world.conn.execute(
            "UPDATE rmm_integrations SET is_active = false WHERE tenant = $1",
            gone.tenant,
        )
        gone_at = time.time()
        assert gone_at - cut_at < 2.0

        regained = await eventually(
            lambda: said(a, "leadership gained")[1:], timeout_s=10
        )
        assert at(regained[0]) - cut_at < RECOVERY_BOUND_S
        families = set((await _families(world, keys)).values())
        await eventually(
            lambda: families <= _refreshed_families(world, since=cut_at),
            timeout_s=15,
        )
        # The one disconnected meanwhile is no longer refreshed.
        await anyio.sleep(3.0)
        assert gone_family not in _refreshed_families(world, since=gone_at + 0.5)
        assert said(a, "stepping down") or said(a, "database unreachable")
    finally:
        a.stop()


@pytest.mark.parametrize(
    "cut", ["tokend", "tokend-marks", "all"], ids=["pool", "marks", "all"]
)
async def test_connections_cut_mid_refresh_lose_nothing(
    world: World, tmp_path: Path, cut: str
) -> None:
    world.endpoint.reuse_detection = True
    # Answers take a while, and each cut waits for requests to be out.
    world.endpoint.delay_s = 0.5
    a = spawn(tmp_path, world.dsn, "a").start()
    try:
        await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
        keys = [await world.connect() for _ in range(10)]
        await eventually(lambda: len(world.refreshes()) >= 10, timeout_s=20)
        names = ["tokend", "tokend-marks", "tokend-leader"] if cut == "all" else [cut]
        for _ in range(3):
            await eventually(lambda: world.endpoint.in_progress > 0, every_s=0.01)
            for name in names:
                for pid in await backends(world.conn, name):
                    await world.conn.execute("SELECT pg_terminate_backend($1)", pid)
            await anyio.sleep(1.5)
        count = len(world.refreshes())
        await eventually(lambda: len(world.refreshes()) >= count + 20, timeout_s=30)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        if cut != "tokend-marks":
            # Answers whose transaction died were stored from the journal.
            assert said(a, "journaled answer stored")

        for key in keys:
            stored = (await world.credentials(key)).refresh_token
            assert world.endpoint.is_current(stored), key
            lifecycle = await world.lifecycle(key)
            assert lifecycle is not None and lifecycle["status"] == "scheduled"
        assert world.refreshes("reused") == []
        assert world.refreshes("revoked") == []
    finally:
        a.stop()
