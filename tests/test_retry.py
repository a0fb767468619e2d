"""Transient failures end to end: backoff, Retry-After, retries past the
access token's expiry, one INTEGRATION_TOKEN_EXPIRING a lapse, recovery."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import World, eventually, running
from tests.refreshing import refresh_now, refresher, retry_now
from tokend.fake_endpoint import Fault
from tokend.lifecycle import parse_iso

pytestmark = pytest.mark.anyio

EXPIRING = "INTEGRATION_TOKEN_EXPIRING"
FAILED = "INTEGRATION_TOKEN_REFRESH_FAILED"


def _unavailable(n: int) -> list[Fault]:
    return [Fault(status=503) for _ in range(n)]


async def test_retries_back_off_outlive_the_token_and_warn_once_a_lapse(
    world: World,
) -> None:
    endpoint = world.endpoint
    endpoint.expires_in_s = 3
    # A first lapse: 429 with Retry-After, then 503s past the expiry, then a
    # success; a second lapse: 503s again, then successes.
    endpoint.faults.extend(
        [
            Fault(status=429, headers={"Retry-After": "2"}),
            *_unavailable(8),
            Fault(action="grant"),
            *_unavailable(12),
        ]
    )
    config = world.config(
        retry={"initial_s": 0.2, "max_s": 0.8, "expiring_warning_s": 1.0}
    )
    async with running(config):
        key = await world.connect(expires_in_s=3)
        first = await world.credentials(key)

        async def healed() -> list[dict[str, Any]] | None:
            events = await world.events(key)
            recovered = [
                e for e in events if e["type"] == "INTEGRATION_TOKEN_RECOVERED"
            ]
            return events if len(recovered) == 2 else None

        events = await eventually(healed, timeout_s=40)
        lifecycle = await world.lifecycle(key)

    arrivals = [r.at for r in endpoint.requests]
    # Retry-After: 2 was honoured before the second attempt.
    assert arrivals[1] - arrivals[0] >= 2.0
    # The first streak went on past the first token's expiry, then healed.
    streak = arrivals[:10]
    assert streak[-1] > first.expires_at
    assert [r.action for r in endpoint.requests[:11]] == (
        ["answer"] * 9 + ["grant", "answer"]
    )

    types = [e["type"] for e in events]
    assert types.count(FAILED) == 9 + 12
    # Exactly one EXPIRING for each of the two lapses, each naming its expiry.
    expiring = [e for e in events if e["type"] == EXPIRING]
    assert len(expiring) == 2
    lapses = [parse_iso(e["expires_at"], "") for e in expiring]
    assert lapses[0] == pytest.approx(first.expires_at, abs=0.002)
    assert lapses[1] is not None and lapses[0] is not None and lapses[1] > lapses[0]
    assert types.index(EXPIRING) < types.index("INTEGRATION_TOKEN_RECOVERED")
    assert lifecycle is not None and lifecycle["consecutiveFailures"] == 0
    assert lifecycle["lastRefreshFailure"] is None


async def test_consecutive_failures_grow_the_backoff_to_its_cap(world: World) -> None:
    """Each retry's delay stays within its full-jitter ceiling."""
    world.endpoint.faults.extend(_unavailable(8))
    config = world.config(
        retry={"initial_s": 1.0, "max_s": 8.0}, database={"pool_size": 2}
    )
    key = await world.connect(notify=False)
    delays = []
    async with refresher(config) as r:
        assert await refresh_now(r, key) == "transient"
        for _ in range(8):
            lifecycle = await world.lifecycle(key)
            assert lifecycle is not None
            failed_at = parse_iso(lifecycle["lastRefreshFailure"]["failedAt"], "")
            next_at = parse_iso(lifecycle["nextRefreshAt"], "")
            assert failed_at is not None and next_at is not None
            delays.append(next_at - failed_at)
            await retry_now(r, key)
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert 0 <= delay <= ceiling + 0.002
    lifecycle = await world.lifecycle(key)
    assert lifecycle is not None and lifecycle["status"] == "scheduled"
    assert lifecycle["lastScheduleSource"] == "proactive_refresh_success"
