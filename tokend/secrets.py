"""Secret stores: where integration credentials and client secrets live.

Secrets are addressed by (tenant, name); app-wide secrets use the nil uuid
`APP` as tenant. Values are bytes; callers parse them.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from typing import Protocol
from uuid import UUID

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokend.db import Conn
from tokend.errors import ConfigError, SecretError

APP = UUID(int=0)

SecretKey = tuple[UUID, str]


class SecretStore(Protocol):
    """What the refresher needs of a secret store.

    `conn` lets a store that lives in Postgres join the caller's transaction;
    other stores ignore it.
    """

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]: ...

    async def put(
        self,
        tenant: UUID,
        name: str,
        value: bytes,
        *,
        conn: Conn | None = None,
    ) -> None: ...


def decode_key(text: str, key_id: str) -> bytes:
    """A base64 AES-256 key; errors name the key id, never the material."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        problem = f"key {key_id!r} is not valid base64"
        raise ConfigError("secrets.key", problem) from None
    if len(key) != 32:
        raise ConfigError(
            "secrets.key", f"key {key_id!r} must be 32 bytes, got {len(key)}"
        )
    return key


class Cipher:
    """AES-256-GCM with the tenant and name bound in as additional data."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ConfigError("secrets.key_id", f"no key with id {current!r}")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = current

    @staticmethod
    def _aad(tenant: UUID, name: str) -> bytes:
        return tenant.bytes + name.encode()

    def encrypt(
        self, tenant: UUID, name: str, value: bytes
    ) -> tuple[str, bytes, bytes]:
        nonce = os.urandom(12)
        sealed = self._keys[self.current].encrypt(nonce, value, self._aad(tenant, name))
        return self.current, nonce, sealed

    def decrypt(
        self, tenant: UUID, name: str, key_id: str, nonce: bytes, sealed: bytes
    ) -> bytes:
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretError(
                f"secret {name!r} of tenant {tenant} is sealed with unknown "
                f"key id {key_id!r}"
            )
        try:
            return aead.decrypt(nonce, sealed, self._aad(tenant, name))
        except InvalidTag:
            raise SecretError(
                f"secret {name!r} of tenant {tenant} does not open with key "
                f"{key_id!r} (wrong key, or the row was altered or moved)"
            ) from None


_READ = """
SELECT s.tenant, s.name, s.key_id, s.nonce, s.ciphertext
FROM tokend_secrets s
JOIN unnest($1::uuid[], $2::text[]) AS k(tenant, name)
  ON s.tenant = k.tenant AND s.name = k.name
"""

_WRITE = """
INSERT INTO tokend_secrets (tenant, name, key_id, nonce, ciphertext)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant, name) DO UPDATE SET
    key_id = excluded.key_id, nonce = excluded.nonce,
    ciphertext = excluded.ciphertext, updated_at = now()
"""


class PostgresSecretStore:
    """Secrets encrypted in the `tokend_secrets` table."""

    def __init__(self, pool: asyncpg.Pool | Conn, cipher: Cipher) -> None:
        # A pool for the daemon; one connection will do for tools and seeding.
        self._pool = pool
        self.cipher = cipher

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]:
        wanted = list(keys)
        tenants = [tenant for tenant, _ in wanted]
        names = [name for _, name in wanted]
        if conn is None:
            rows = await self._pool.fetch(_READ, tenants, names)
        else:
            rows = await conn.fetch(_READ, tenants, names)
        return {
            (r["tenant"], r["name"]): self.cipher.decrypt(
                r["tenant"], r["name"], r["key_id"], r["nonce"], r["ciphertext"]
            )
            for r in rows
        }

    async def get(self, tenant: UUID, name: str) -> bytes | None:
        return (await self.get_many([(tenant, name)])).get((tenant, name))

    async def put(
        self,
        tenant: UUID,
        name: str,
        value: bytes,
        *,
        conn: Conn | None = None,
    ) -> None:
        key_id, nonce, sealed = self.cipher.encrypt(tenant, name, value)
        if conn is None:
            await self._pool.execute(_WRITE, tenant, name, key_id, nonce, sealed)
        else:
            await conn.execute(_WRITE, tenant, name, key_id, nonce, sealed)
