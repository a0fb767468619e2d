"""The schedule: a min-heap of refresh deadlines with lazy deletion by nonce.

Each integration has at most one live entry, the one `_live` holds; any
other entry popped from the heap is stale and dropped. A newer nonce always
wins, so results arriving out of order (a notification and a refresh racing)
cannot resurrect an old deadline.

An entry is one Python int packing, from the most significant bits down:
the deadline in milliseconds since the epoch (64 bits), the nonce (64),
the provider's index (16), the tenant (128) and the integration id (128).
Ints compare in C, so the heap orders by deadline at C speed, and one
object per integration (about 80 bytes) plus its key (64) and a dict slot
is all a scheduled integration costs: a million fit in under 200 MB. The
start-of-term load builds entries in SQL (see `store.Store.load_active`)
with `ENTRY_SQL`, so most rows never become Python objects other than these.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple
from uuid import UUID

import anyio

from tokend.store import IntegrationKey

_UUID_BITS = 128
_KEY_BITS = 2 * _UUID_BITS
_PROVIDER_SHIFT = _KEY_BITS
_PROVIDER_BITS = 16
_NONCE_SHIFT = _PROVIDER_SHIFT + _PROVIDER_BITS
_NONCE_BITS = 64
_DEADLINE_SHIFT = _NONCE_SHIFT + _NONCE_BITS

_UUID_MASK = (1 << _UUID_BITS) - 1
_KEY_MASK = (1 << _KEY_BITS) - 1
_PROVIDER_MASK = (1 << _PROVIDER_BITS) - 1
_NONCE_MASK = (1 << _NONCE_BITS) - 1
# Signed 64-bit in SQL (int8send), so both stay below 2**63.
MAX_NONCE = (1 << 63) - 1
_MAX_DEADLINE_MS = (1 << 63) - 1
# Signed 16-bit in SQL (int2send).
MAX_PROVIDERS = 1 << 15


# The SQL expression of an entry's bytes, over the columns `deadline_ms`,
# `nonce` and `provider_index` (int8, int8, int2, none negative) and
# `tenant`, `integration_id`; `int.from_bytes(b, "big")` of it is the entry.
ENTRY_SQL = (
    "int8send(deadline_ms) || int8send(nonce) || int2send(provider_index)"
    " || uuid_send(tenant) || uuid_send(integration_id)"
)


def key_int(key: IntegrationKey) -> int:
    return (key.tenant.int << _UUID_BITS) | key.integration_id.int


def _key(entry: int) -> IntegrationKey:
    key = entry & _KEY_MASK
    return IntegrationKey(UUID(int=key >> _UUID_BITS), UUID(int=key & _UUID_MASK))


def _nonce(entry: int) -> int:
    return (entry >> _NONCE_SHIFT) & _NONCE_MASK


def _deadline(entry: int) -> float:
    return (entry >> _DEADLINE_SHIFT) / 1000


class Due(NamedTuple):
    key: IntegrationKey
    nonce: int
    deadline: float
    provider: str


class Schedule:
    def __init__(self) -> None:
        self._heap: list[int] = []
        # Key (as an int) -> its live entry.
        self._live: dict[int, int] = {}
        # The highest nonce seen of integrations without a live entry
        # (dropped, or popped and in flight); a live entry holds its own.
        self._gone: dict[int, int] = {}
        self.providers: list[str] = []
        self._provider_index: dict[str, int] = {}
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: IntegrationKey) -> bool:
        return key_int(key) in self._live

    def provider_index(self, provider: str) -> int:
        index = self._provider_index.get(provider)
        if index is None:
            if len(self.providers) >= MAX_PROVIDERS:
                raise ValueError(f"more than {MAX_PROVIDERS} providers")
            index = self._provider_index[provider] = len(self.providers)
            self.providers.append(provider)
        return index

    def pack(
        self, key: IntegrationKey, deadline: float, nonce: int, provider: str
    ) -> int:
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce out of range: {nonce}")
        if not math.isfinite(deadline):
            raise ValueError(f"deadline not a finite time: {deadline}")
        deadline_ms = min(max(round(deadline * 1000), 0), _MAX_DEADLINE_MS)
        return (
            (deadline_ms << _DEADLINE_SHIFT)
            | (nonce << _NONCE_SHIFT)
            | (self.provider_index(provider) << _PROVIDER_SHIFT)
            | key_int(key)
        )

    def _due(self, entry: int) -> Due:
        provider = self.providers[(entry >> _PROVIDER_SHIFT) & _PROVIDER_MASK]
        return Due(_key(entry), _nonce(entry), _deadline(entry), provider)

    def _known_nonce(self, key: int) -> int:
        live = self._live.get(key)
        return _nonce(live) if live is not None else self._gone.get(key, -1)

    def nonce(self, key: IntegrationKey) -> int:
        """The highest nonce known for `key` (-1: none)."""
        return self._known_nonce(key_int(key))

    def put(
        self, key: IntegrationKey, deadline: float, nonce: int, provider: str
    ) -> bool:
        """Schedule `key`; False (and no change) if a newer nonce is known."""
        return self._put(self.pack(key, deadline, nonce, provider))

    def _put(self, entry: int) -> bool:
        key = entry & _KEY_MASK
        if _nonce(entry) < self._known_nonce(key):
            return False
        earliest = self._heap[0] >> _DEADLINE_SHIFT if self._heap else math.inf
        self._gone.pop(key, None)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if entry >> _DEADLINE_SHIFT < earliest:
            self._wake.set()
        self._compact()
        return True

    def load(self, entries: list[int], unseen: dict[int, int]) -> None:
        """Add loaded entries (packed, as `pack` or `ENTRY_SQL` makes them),
        each as `put` would, and strike their keys from `unseen` (a
        `snapshot`). A batch of integrations the schedule knows nothing of
        goes in at C speed: the start of a term."""
        keys = [entry & _KEY_MASK for entry in entries]
        if unseen:
            for key in keys:
                unseen.pop(key, None)
        if self._live.keys().isdisjoint(keys) and self._gone.keys().isdisjoint(keys):
            self._live.update(zip(keys, entries, strict=True))
            if len(entries) > len(self._heap):
                self._heap.extend(entries)
                heapq.heapify(self._heap)
            else:
                for entry in entries:
                    heapq.heappush(self._heap, entry)
            self._wake.set()
            self._compact()
            return
        for entry, key in zip(entries, keys, strict=True):
            live = self._live.get(key)
            if live is None or _nonce(live) != _nonce(entry):
                self._put(entry)

    def drop(self, key: IntegrationKey, nonce: int | None = None) -> None:
        """Unschedule `key` unless a newer nonce than `nonce` is scheduled."""
        self._drop(key_int(key), nonce)

    def _drop(self, key: int, nonce: int | None) -> None:
        known = self._known_nonce(key)
        live = self._live.get(key)
        if live is not None:
            if nonce is not None and _nonce(live) > nonce:
                return  # rescheduled since: the newer entry stands
            del self._live[key]
        highest = known if nonce is None else max(known, nonce)
        if highest >= 0:
            self._gone[key] = highest

    def snapshot(self) -> dict[int, int]:
        """The live entries by key: what a resync has yet to see."""
        return dict(self._live)

    @staticmethod
    def seen(unseen: dict[int, int], key: IntegrationKey) -> None:
        unseen.pop(key_int(key), None)

    def drop_unseen(self, unseen: dict[int, int]) -> None:
        """Drop what a resync did not see, unless rescheduled meanwhile."""
        for key, entry in unseen.items():
            self._drop(key, _nonce(entry))

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()
        self._gone.clear()
        self._wake.set()

    def get(self, key: IntegrationKey) -> Due | None:
        entry = self._live.get(key_int(key))
        return None if entry is None else self._due(entry)

    def pop_due(self, now: float) -> Due | None:
        """Remove and return the earliest entry if its deadline has come."""
        while self._heap:
            entry = self._heap[0]
            key = entry & _KEY_MASK
            if self._live.get(key) != entry:
                heapq.heappop(self._heap)
                continue
            if _deadline(entry) > now:
                return None
            heapq.heappop(self._heap)
            del self._live[key]
            self._gone[key] = _nonce(entry)
            return self._due(entry)
        return None

    def next_deadline(self) -> float | None:
        while self._heap:
            entry = self._heap[0]
            if self._live.get(entry & _KEY_MASK) == entry:
                return _deadline(entry)
            heapq.heappop(self._heap)
        return None

    def upcoming(self, limit: int) -> list[Due]:
        """The next `limit` live entries, earliest first (for /status)."""
        return [self._due(e) for e in heapq.nsmallest(limit, self._live.values())]

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
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
