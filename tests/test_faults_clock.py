"""Clock faults: deadlines already past at load are refreshed at once but
spread over the provider's rate limit, and a step of the host clock does
not make the scheduler sleep past a deadline."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.faults import at, said, spawn
from tests.helpers import World, eventually, running
from tokend import dispatcher, refresher
from tokend.daemon import Daemon
from tokend.lifecycle import iso

pytestmark = pytest.mark.anyio


async def test_past_deadlines_at_load_are_refreshed_at_once_within_the_rate(
    world: World, tmp_path: Path
) -> None:
    past = time.time() - 3600
    lifecycle = {
        "status": "scheduled",
        "scheduleNonce": 1,
        "expiresAt": iso(time.time() + 3600),
        "nextRefreshAt": iso(past),
    }
    for _ in range(12):
        await world.connect(notify=False, settings={"tokenLifecycle": lifecycle})
    a = spawn(
        tmp_path,
        world.dsn,
        "a",
        providers={"ninjaone": {"allow_http_loopback": True, "rate_per_s": 4.0}},
    ).start()
    try:
        await eventually(lambda: len(world.refreshes()) >= 12, timeout_s=20)
        loaded = at(said(a, "integrations loaded")[0])
        times = sorted(e.at for e in world.refreshes()[:12])
        assert times[0] - loaded < 1.0, "the first overdue refresh waited"
        # A burst of one second's worth (4), then four a second: the last
        # of the twelve about two seconds after the first, not all at once.
        assert times[-1] - times[0] >= 1.5
    finally:
        a.stop()


class _Clock:
    """A wall clock the test can step; monotonic time is left alone."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


async def test_a_clock_step_does_not_make_the_scheduler_oversleep(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    fake = SimpleNamespace(time=clock.time, monotonic=time.monotonic)
    monkeypatch.setattr(dispatcher, "time", fake)
    monkeypatch.setattr(refresher, "time", fake)
    # Tokens live two hours and are refreshed an hour before they expire.
    config = world.config(
        scheduler={"buffer_s": 3600.0, "min_delay_s": 0.5, "max_sleep_s": 1.0}
    )
    async with running(config) as daemon:
        key = await world.connect(expires_in_s=7200)
        await eventually(lambda: key in daemon.schedule)
        entry = daemon.schedule.get(key)
        assert entry is not None and entry.deadline - clock.time() > 3000
        # The dispatcher now sleeps toward a deadline an hour away, and the
        # host clock steps forward by an hour.
        await eventually(lambda: _sleeping(daemon), timeout_s=5)
        clock.offset = 3600.0
        stepped = time.monotonic()
        await eventually(world.refreshes, timeout_s=5)
        assert time.monotonic() - stepped < config.scheduler.max_sleep_s + 1.0


def _sleeping(daemon: Daemon) -> bool:
    """The dispatcher waits on the schedule (nothing has woken it)."""
    return not daemon.schedule._wake.is_set()
