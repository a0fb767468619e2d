"""The heap: earliest first, lazy deletion by nonce, newest nonce wins."""

from __future__ import annotations

import random
import uuid

import pytest

from tokend.config import RetryConfig, SchedulerConfig
from tokend.policy import backoff, deadline
from tokend.schedule import Schedule
from tokend.store import IntegrationKey


def _key() -> IntegrationKey:
    return IntegrationKey(uuid.uuid4(), uuid.uuid4())


def test_pops_in_deadline_order_only_when_due() -> None:
    schedule = Schedule()
    a, b, c = _key(), _key(), _key()
    schedule.put(a, 30.0, 1, "p")
    schedule.put(b, 10.0, 1, "p")
    schedule.put(c, 20.0, 1, "p")
    assert schedule.pop_due(5.0) is None
    assert schedule.next_deadline() == 10.0
    popped = [schedule.pop_due(100.0) for _ in range(3)]
    assert [d.key for d in popped if d] == [b, c, a]
    assert len(schedule) == 0 and schedule.pop_due(100.0) is None


def test_reschedule_replaces_and_stale_entries_are_dropped() -> None:
    schedule = Schedule()
    key = _key()
    schedule.put(key, 10.0, 1, "p")
    schedule.put(key, 50.0, 2, "p")
    assert schedule.pop_due(20.0) is None  # the stale 10.0 entry is skipped
    due = schedule.pop_due(60.0)
    assert due is not None and due.nonce == 2 and due.deadline == 50.0


def test_an_older_nonce_never_overrides_a_newer_one() -> None:
    schedule = Schedule()
    key = _key()
    assert schedule.put(key, 50.0, 5, "p")
    assert not schedule.put(key, 10.0, 4, "p")
    schedule.drop(key, 3)  # an older drop leaves the newer entry alone
    assert schedule.get(key) is not None
    schedule.drop(key, 5)
    assert schedule.get(key) is None
    assert not schedule.put(key, 10.0, 4, "p")  # still older than what was seen


def test_heap_is_compacted_when_stale_entries_pile_up() -> None:
    schedule = Schedule()
    key = _key()
    for nonce in range(5000):
        schedule.put(key, float(nonce), nonce, "p")
    assert len(schedule._heap) < 3000
    assert schedule.next_deadline() == 4999.0


def test_upcoming_lists_earliest_first() -> None:
    schedule = Schedule()
    keys = [_key() for _ in range(5)]
    for i, key in enumerate(keys):
        schedule.put(key, 100.0 - i, 1, "p")
    assert [d.key for d in schedule.upcoming(2)] == [keys[4], keys[3]]


def test_deadline_policy() -> None:
    rng = random.Random(1)
    policy = SchedulerConfig(buffer_s=900, min_delay_s=30, spread_s=0)
    assert deadline(10_000.0, 0.0, policy, rng) == 9_100.0
    assert deadline(500.0, 0.0, policy, rng) == 30.0  # never sooner than min_delay
    spread = SchedulerConfig(buffer_s=900, min_delay_s=30, spread_s=60)
    values = [deadline(10_000.0, 0.0, spread, rng) for _ in range(200)]
    assert all(9_040.0 <= v <= 9_100.0 for v in values)
    assert max(values) - min(values) > 30


@pytest.mark.parametrize("failures", [1, 2, 3, 8, 20])
def test_backoff_is_full_jitter_under_a_doubling_ceiling(failures: int) -> None:
    rng = random.Random(failures)
    policy = RetryConfig(initial_s=5, max_s=300, retry_after_cap_s=900)
    ceiling = min(300, 5 * 2 ** (failures - 1))
    values = [backoff(failures, policy, rng) for _ in range(500)]
    assert all(0 <= v <= ceiling for v in values)
    assert min(values) < ceiling * 0.1 and max(values) > ceiling * 0.9


def test_backoff_honours_retry_after_up_to_the_cap() -> None:
    rng = random.Random(0)
    policy = RetryConfig(initial_s=5, max_s=300, retry_after_cap_s=900)
    assert backoff(1, policy, rng, retry_after_s=120) >= 120
    assert backoff(1, policy, rng, retry_after_s=10_000) == 900
