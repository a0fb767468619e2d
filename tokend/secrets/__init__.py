"""Secret stores: where integration credentials and client secrets live.

Secrets are addressed by (tenant, name); app-wide secrets use the nil uuid
`APP` as tenant. Values are bytes; callers parse them. Three stores keep
them: `postgres` (encrypted rows, the embedded default), `files` (the host
app's folder layout) and `vault` (HashiCorp Vault or OpenBao, KV v2). The
config's `[secrets] backend` picks one; `open_store` builds it.

Failures come in two kinds. `SecretUnavailable` (denied, sealed, down, a
key not configured, a concurrent writer) makes an integration wait and
retry: fixing the store heals it. `SecretError` means one secret is
unusable as stored, and its integration is unschedulable until changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from tokend.errors import SecretError

if TYPE_CHECKING:
    import asyncpg

    from tokend.config import Config, SecretsConfig
    from tokend.db import Conn

APP = UUID(int=0)

SecretKey = tuple[UUID, str]

# The largest value any store accepts: credentials are a few hundred bytes.
MAX_VALUE_BYTES = 1 << 20


@dataclass(frozen=True)
class SecretInfo:
    """What `tokend secrets get` shows of a secret without its value."""

    size: int
    updated_at: float | None
    details: dict[str, str] = field(default_factory=dict)


class SecretStore(Protocol):
    """A place that keeps secrets by (tenant, name).

    `conn` lets a store that lives in Postgres join the caller's transaction;
    other stores ignore it.
    """

    backend: str

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]:
        """The values found; a missing secret is simply absent."""
        ...

    async def put(
        self,
        tenant: UUID,
        name: str,
        value: bytes,
        *,
        conn: Conn | None = None,
    ) -> None: ...

    async def describe(self, tenant: UUID, name: str) -> SecretInfo | None: ...

    def reload(self, config: SecretsConfig) -> list[str]:
        """Apply what can change while running; return the settings that
        changed but take effect only after a restart."""
        ...

    async def aclose(self) -> None: ...


def check_name(name: str) -> str:
    """A secret name is one path segment in every store: refuse the rest.

    The same names must work in all three stores, so the files store's
    rules (nothing that could leave its folder) hold everywhere.
    """
    if not name:
        raise SecretError("secret name is empty")
    if "/" in name or "\\" in name or "\0" in name:
        raise SecretError(f"secret name {name!r} holds a path separator or NUL")
    if name.startswith("."):
        # Also keeps names clear of the files store's temporary files.
        raise SecretError(f"secret name {name!r} starts with a dot")
    if len(name.encode()) > 200:
        raise SecretError(f"secret name {name[:20]!r}... is over 200 bytes")
    return name


def check_value(value: bytes) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise SecretError(
            f"secret value of {len(value)} bytes is over {MAX_VALUE_BYTES} bytes"
        )
    return value


def open_store(config: Config, pool: asyncpg.Pool | Conn | None) -> SecretStore:
    """The store the config names; `pool` is needed by `postgres` only."""
    # Imported here: each store pulls in its own dependencies, and this
    # package is imported by the config module for `check_name`.
    backend = config.secrets.backend
    if backend == "files":
        from tokend.secrets.files import FileSecretStore

        return FileSecretStore(config.secrets.files)
    if backend == "vault":
        from tokend.secrets.vault import VaultSecretStore

        return VaultSecretStore(config.secrets.vault)
    from tokend.secrets.postgres import postgres_store

    if pool is None:
        raise ValueError("the postgres secret store needs a database connection")
    return postgres_store(config.secrets, pool)
