"""Prometheus metrics. No tenant or integration labels: cardinality stays
bounded by providers, outcomes and statuses."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# The text format would carry a `_created` gauge beside every counter and
# histogram: a second series each that no alert or dashboard reads.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60, 300, 900)
_REMAINING_BUCKETS = (0, 60, 300, 600, 900, 1200, 1800, 3600, 7200, 86400)

leader = Gauge("tokend_leader", "1 while this process leads, else 0", registry=REGISTRY)
leader_transitions = Counter(
    "tokend_leader_transitions_total",
    "Times this process gained or lost leadership",
    ["change"],
    registry=REGISTRY,
)
integrations = Gauge(
    "tokend_integrations",
    "Integrations known to the leader, by lifecycle status",
    ["status"],
    registry=REGISTRY,
)
heap_entries = Gauge(
    "tokend_heap_entries", "Live entries in the deadline heap", registry=REGISTRY
)
next_deadline = Gauge(
    "tokend_next_deadline_seconds",
    "Seconds until the earliest deadline (negative when overdue, NaN when none)",
    registry=REGISTRY,
)
tokens_expired = Gauge(
    "tokend_tokens_expired",
    "Integrations still being refreshed whose access token has expired",
    registry=REGISTRY,
)
refreshes = Counter(
    "tokend_refreshes_total",
    "Refresh attempts by provider and outcome",
    ["provider", "outcome"],
    registry=REGISTRY,
)
refresh_duration = Histogram(
    "tokend_refresh_duration_seconds",
    "Duration of one refresh, lock to commit",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
refresh_lateness = Histogram(
    "tokend_refresh_lateness_seconds",
    "How late a refresh started against its deadline",
    buckets=_LATENESS_BUCKETS,
    registry=REGISTRY,
)
token_remaining = Histogram(
    "tokend_token_remaining_seconds",
    "Remaining access-token lifetime when a refresh started",
    buckets=_REMAINING_BUCKETS,
    registry=REGISTRY,
)
notifications = Counter(
    "tokend_notifications_total",
    "Notifications received, by event and result",
    ["event", "result"],
    registry=REGISTRY,
)
db_reconnects = Counter(
    "tokend_db_reconnects_total",
    "Reconnects of tokend's own Postgres connections",
    ["connection"],
    registry=REGISTRY,
)
config_reloads = Counter(
    "tokend_config_reloads_total",
    "Config reloads by result",
    ["result"],
    registry=REGISTRY,
)
events_emitted = Counter(
    "tokend_events_emitted_total",
    "Events written to the outbox and notified",
    ["type"],
    registry=REGISTRY,
)

# The outcomes a refresh is counted under (refresher.Refresher.refresh).
REFRESH_OUTCOMES = (
    "success",
    "transient",
    "reconnect_required",
    "client_rejected",
    "unschedulable",
    "rotated_elsewhere",
    "skipped",
)

# Series with fixed label values exist from the start, at zero, so that
# rate() and increase() see the first event and absent series mean a problem.
for _change in ("gained", "lost"):
    leader_transitions.labels(_change)
for _result in ("success", "failure"):
    config_reloads.labels(_result)
db_reconnects.labels("leader")


def declare_providers(providers: Iterable[str]) -> None:
    """Create every provider's refresh series at zero."""
    for provider in providers:
        for outcome in REFRESH_OUTCOMES:
            refreshes.labels(provider, outcome)
        refresh_duration.labels(provider)


secret_store_errors = Counter(
    "tokend_secret_store_errors_total",
    "Secret-store failures that made an integration wait, by store and code",
    ["store", "code"],
    registry=REGISTRY,
)
unconfigured_provider = Counter(
    "tokend_unconfigured_provider_total",
    "Integrations made unschedulable because their provider is not configured "
    "(the provider's name is in the log, once)",
    registry=REGISTRY,
)
journal_pending = Gauge(
    "tokend_journal_pending",
    "Provider answers in the write-ahead journal not yet stored in Postgres",
    registry=REGISTRY,
)
journal_window = Histogram(
    "tokend_journal_window_seconds",
    "From a provider answer received to the answer durable in the journal",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
journal_replays = Counter(
    "tokend_journal_replays_total",
    "Journaled answers applied after their refresh could not store them",
    ["result"],
    registry=REGISTRY,
)
inflight_waits = Counter(
    "tokend_inflight_waits_total",
    "Refreshes held back by another owner's unfinished refresh",
    registry=REGISTRY,
)
