"""Advisory lock keys: 64-bit, derived from namespaced names.

The same derivation is installed in SQL as `tokend_lock_key(text)`, so the
host app can take an integration's lock without knowing Python.
"""

from __future__ import annotations

import hashlib
from uuid import UUID


def lock_key(name: str) -> int:
    """The first 8 bytes of md5(name) as a signed bigint, as in SQL."""
    digest = hashlib.md5(name.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def leader_key(lock_name: str) -> int:
    return lock_key(f"tokend.leader:{lock_name}")


def integration_key(tenant: UUID, integration_id: UUID) -> int:
    return lock_key(f"tokend.integration:{tenant}:{integration_id}")
