"""The heap: earliest first, lazy deletion by nonce, newest nonce wins; its
compact entries keep what goes in and cost under 200 bytes an integration."""

from __future__ import annotations

import random
import tracemalloc
import uuid

import pytest

from tokend.config import RetryConfig, SchedulerConfig
from tokend.policy import backoff, deadline
from tokend.schedule import MAX_NONCE, Schedule
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


def test_an_entry_keeps_key_deadline_nonce_and_provider() -> None:
    schedule = Schedule()
    k = _key()
    assert schedule.put(k, 1_790_000_000.123, 2**40 + 7, "ninjaone")
    due = schedule.get(k)
    assert due is not None
    assert due.key == k
    assert due.nonce == 2**40 + 7
    assert due.deadline == 1_790_000_000.123
    assert due.provider == "ninjaone"
    assert k in schedule and len(schedule) == 1


def test_a_reschedule_replaces_the_entry_and_an_older_nonce_loses() -> None:
    schedule = Schedule()
    k = _key()
    schedule.put(k, 100.0, 3, "p")
    assert schedule.put(k, 500.0, 4, "p")
    assert not schedule.put(k, 50.0, 2, "p")
    assert schedule.next_deadline() == 500.0
    assert schedule.pop_due(200.0) is None
    due = schedule.pop_due(600.0)
    assert due is not None and due.nonce == 4
    # Popped (in flight): a late result with an older nonce is refused.
    assert not schedule.put(k, 700.0, 3, "p")
    assert schedule.put(k, 700.0, 5, "p")


def test_drop_spares_a_newer_entry_and_remembers_the_nonce() -> None:
    schedule = Schedule()
    k = _key()
    schedule.put(k, 100.0, 5, "p")
    schedule.drop(k, 4)
    assert k in schedule
    schedule.drop(k, 5)
    assert k not in schedule
    assert not schedule.put(k, 100.0, 4, "p")
    assert schedule.put(k, 100.0, 5, "p")
    schedule.drop(k)
    assert k not in schedule
    assert schedule.next_deadline() is None


def test_load_of_new_integrations_and_of_known_ones() -> None:
    schedule = Schedule()
    keys = [_key() for _ in range(100)]
    entries = [schedule.pack(k, 1000.0 + i, 7, "p") for i, k in enumerate(keys)]
    schedule.load(entries[:60], {})
    schedule.load(entries[60:], {})
    assert len(schedule) == 100
    assert schedule.next_deadline() == 1000.0
    # Known integrations: a newer nonce replaces, an older one is refused.
    schedule.put(keys[0], 5000.0, 9, "p")
    newer = schedule.pack(keys[1], 1.0, 8, "p")
    older = schedule.pack(keys[0], 1.0, 8, "p")
    schedule.load([newer, older], {})
    first = schedule.get(keys[1])
    kept = schedule.get(keys[0])
    assert first is not None and first.deadline == 1.0 and first.nonce == 8
    assert kept is not None and kept.deadline == 5000.0 and kept.nonce == 9
    assert [schedule.pop_due(10_000.0) for _ in range(100)][-1] is not None


def test_a_resync_drops_what_it_did_not_see_unless_rescheduled_meanwhile() -> None:
    schedule = Schedule()
    seen, gone, moved = _key(), _key(), _key()
    for k in (seen, gone, moved):
        schedule.put(k, 100.0, 1, "p")
    unseen = schedule.snapshot()
    schedule.load([schedule.pack(seen, 100.0, 1, "p")], unseen)
    schedule.put(moved, 200.0, 2, "p")  # a notification during the load
    schedule.drop_unseen(unseen)
    assert seen in schedule and moved in schedule
    assert gone not in schedule
    assert not schedule.put(gone, 100.0, 0, "p")


def test_out_of_range_values_are_refused_or_clamped() -> None:
    schedule = Schedule()
    with pytest.raises(ValueError, match="nonce"):
        schedule.put(_key(), 1.0, MAX_NONCE + 1, "p")
    with pytest.raises(ValueError, match="nonce"):
        schedule.put(_key(), 1.0, -1, "p")
    with pytest.raises(ValueError, match="deadline"):
        schedule.put(_key(), float("inf"), 1, "p")
    k = _key()
    schedule.put(k, -5.0, 0, "p")
    due = schedule.get(k)
    assert due is not None and due.deadline == 0.0


def test_a_scheduled_integration_costs_under_200_bytes() -> None:
    count = 20_000
    keys = [_key() for _ in range(count)]
    schedule = Schedule()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = [
            schedule.pack(k, 1_790_000_000.0 + i, 500 + i, "p")
            for i, k in enumerate(keys)
        ]
        schedule.load(entries, {})
        del entries
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(schedule) == count
    assert per_entry < 200, per_entry
