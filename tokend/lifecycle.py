"""`settings.tokenLifecycle`: the non-secret record tokend keeps beside each
integration. Timestamps are epoch seconds in memory and ISO-8601 UTC in JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATUSES = (
    "scheduled",
    "refreshing",
    "retrying",
    "reconnect_required",
    "unschedulable",
    "inactive",
)
# Statuses that keep an integration in the heap.
SCHEDULABLE = frozenset({"scheduled", "refreshing", "retrying"})
MAX_MESSAGE = 500


class LifecycleInvalid(ValueError):
    """A stored lifecycle is not the object tokend writes."""


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: Any, key: str) -> float | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise LifecycleInvalid(f"{key}: expected an ISO-8601 string")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LifecycleInvalid(f"{key}: not an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def safe_message(text: str) -> str:
    """Bound a failure message; callers never pass token text in."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retryable: bool
    http_status: int | None
    failed_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": safe_message(self.message),
            "retryable": self.retryable,
            "httpStatus": self.http_status,
            "failedAt": iso(self.failed_at),
        }


@dataclass(frozen=True)
class InFlight:
    """A refresh request that is (or was) out: who sent it and when.

    `orphaned_at` is when a later refresh first found it under the lock with
    its owner gone; the retry with the old refresh token waits from then.
    """

    owner: str
    since: float
    orphaned_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "since": iso(self.since),
            "orphanedAt": iso(self.orphaned_at),
        }

    @classmethod
    def from_json(cls, doc: Any) -> InFlight | None:
        if doc is None:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("owner"), str):
            raise LifecycleInvalid("inFlight: expected an object with an owner")
        since = parse_iso(doc.get("since"), "inFlight.since")
        if since is None:
            raise LifecycleInvalid("inFlight.since: missing")
        orphaned_at = parse_iso(doc.get("orphanedAt"), "inFlight.orphanedAt")
        return cls(doc["owner"], since, orphaned_at)


_TIMES = {
    "expires_at": "expiresAt",
    "next_refresh_at": "nextRefreshAt",
    "last_scheduled_at": "lastScheduledAt",
    "last_refresh_attempt_at": "lastRefreshAttemptAt",
    "last_refresh_at": "lastRefreshAt",
    "expiring_notified_for": "expiringNotifiedFor",
}


@dataclass(frozen=True)
class Lifecycle:
    status: str = "scheduled"
    schedule_nonce: int = 0
    expires_at: float | None = None
    next_refresh_at: float | None = None
    last_scheduled_at: float | None = None
    last_schedule_source: str | None = None
    last_refresh_attempt_at: float | None = None
    last_refresh_at: float | None = None
    consecutive_failures: int = 0
    reconnect_required: bool = False
    reconnect_reason: str | None = None
    last_refresh_failure: dict[str, Any] | None = field(default=None, compare=False)
    owner_id: str | None = None
    # The expiresAt an INTEGRATION_TOKEN_EXPIRING event was sent for: one a lapse.
    expiring_notified_for: float | None = None
    # Set, and committed, before a refresh request goes out; cleared by the
    # write that records its answer. Found set under the integration's lock,
    # it means a refresh whose process or connection died mid-way.
    in_flight: InFlight | None = None

    @property
    def schedulable(self) -> bool:
        return self.status in SCHEDULABLE and not self.reconnect_required

    def replace(self, **changes: Any) -> Lifecycle:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": self.status,
            "scheduleNonce": self.schedule_nonce,
            "lastScheduleSource": self.last_schedule_source,
            "consecutiveFailures": self.consecutive_failures,
            "reconnectRequired": self.reconnect_required,
            "reconnectReason": self.reconnect_reason,
            "lastRefreshFailure": self.last_refresh_failure,
            "ownerId": self.owner_id,
        }
        for attr, key in _TIMES.items():
            doc[key] = iso(getattr(self, attr))
        if self.in_flight is not None:
            doc["inFlight"] = self.in_flight.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Lifecycle:
        if not isinstance(doc, dict):
            raise LifecycleInvalid("expected an object")
        status = doc.get("status", "scheduled")
        if status not in STATUSES:
            raise LifecycleInvalid(f"status: unknown value {status!r}")
        nonce = doc.get("scheduleNonce", 0)
        failures = doc.get("consecutiveFailures", 0)
        for key, value in (("scheduleNonce", nonce), ("consecutiveFailures", failures)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LifecycleInvalid(f"{key}: expected an integer >= 0")
        failure = doc.get("lastRefreshFailure")
        times = {attr: parse_iso(doc.get(key), key) for attr, key in _TIMES.items()}
        return cls(
            status=status,
            schedule_nonce=nonce,
            last_schedule_source=_opt_str(doc, "lastScheduleSource"),
            consecutive_failures=failures,
            reconnect_required=doc.get("reconnectRequired") is True,
            reconnect_reason=_opt_str(doc, "reconnectReason"),
            last_refresh_failure=failure if isinstance(failure, dict) else None,
            owner_id=_opt_str(doc, "ownerId"),
            in_flight=InFlight.from_json(doc.get("inFlight")),
            **times,
        )


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None
