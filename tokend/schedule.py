"""The schedule: a min-heap of refresh deadlines with lazy deletion by nonce.

Each integration has at most one live entry, the one whose nonce and
deadline match `_live`; anything else popped from the heap is stale and
dropped. A newer nonce always wins, so results arriving out of order (a
notification and a refresh racing) cannot resurrect an old deadline.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import anyio

from tokend.store import IntegrationKey


class Due(NamedTuple):
    key: IntegrationKey
    nonce: int
    deadline: float
    provider: str


class _Live(NamedTuple):
    nonce: int
    deadline: float
    provider: str


class Schedule:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, IntegrationKey]] = []
        self._live: dict[IntegrationKey, _Live] = {}
        # The highest nonce seen per integration, kept after a drop too.
        self._nonces: dict[IntegrationKey, int] = {}
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: IntegrationKey) -> bool:
        return key in self._live

    def put(
        self, key: IntegrationKey, deadline: float, nonce: int, provider: str
    ) -> bool:
        """Schedule `key`; False (and no change) if a newer nonce is known."""
        if nonce < self._nonces.get(key, -1):
            return False
        earliest = self._heap[0][0] if self._heap else math.inf
        self._nonces[key] = nonce
        self._live[key] = _Live(nonce, deadline, provider)
        heapq.heappush(self._heap, (deadline, nonce, key))
        if deadline < earliest:
            self._wake.set()
        self._compact()
        return True

    def drop(self, key: IntegrationKey, nonce: int | None = None) -> None:
        """Unschedule `key` unless a newer nonce than `nonce` is scheduled."""
        live = self._live.get(key)
        if live is not None and (nonce is None or live.nonce <= nonce):
            del self._live[key]
        if nonce is not None:
            self._nonces[key] = max(nonce, self._nonces.get(key, -1))

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()
        self._nonces.clear()
        self._wake.set()

    def nonces(self) -> dict[IntegrationKey, int]:
        """A copy of the live entries' nonces."""
        return {key: live.nonce for key, live in self._live.items()}

    def get(self, key: IntegrationKey) -> Due | None:
        live = self._live.get(key)
        return None if live is None else Due(key, *live)

    def pop_due(self, now: float) -> Due | None:
        """Remove and return the earliest entry if its deadline has come."""
        while self._heap:
            deadline, nonce, key = self._heap[0]
            live = self._live.get(key)
            if live is None or live.nonce != nonce or live.deadline != deadline:
                heapq.heappop(self._heap)
                continue
            if deadline > now:
                return None
            heapq.heappop(self._heap)
            del self._live[key]
            return Due(key, nonce, deadline, live.provider)
        return None

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, nonce, key = self._heap[0]
            live = self._live.get(key)
            if live is not None and live.nonce == nonce and live.deadline == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    def upcoming(self, limit: int) -> list[Due]:
        """The next `limit` live entries, earliest first (for /status)."""
        entries = sorted((live.deadline, key) for key, live in self._live.items())
        return [Due(key, *self._live[key]) for _, key in entries[:limit]]

    def wake(self) -> None:
        self._wake.set()

    async def wait(self, timeout_s: float) -> None:
        """Sleep until woken by an earlier deadline, or `timeout_s` passes."""
        self._wake = anyio.Event()
        with anyio.move_on_after(max(timeout_s, 0.0)):
            await self._wake.wait()

    def _compact(self) -> None:
        # Stale entries are dropped lazily; rebuild once they outnumber the live.
        if len(self._heap) > 2 * len(self._live) + 1024:
            self._heap = [
                (live.deadline, live.nonce, key) for key, live in self._live.items()
            ]
            heapq.heapify(self._heap)
