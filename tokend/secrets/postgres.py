"""The Postgres store: AES-256-GCM ciphertexts in `tokend_secrets`, and the
re-encryption of every row under a new key (`tokend secrets rotate-key`).

Reads and writes can join the caller's transaction, so a refresh reads its
credentials and writes the rotated ones in the transaction that holds the
integration's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import UUID

import anyio
import asyncpg

from tokend.config import SecretsConfig
from tokend.db import Conn
from tokend.errors import SecretUnavailable
from tokend.secrets import APP, SecretInfo, SecretKey, check_name, check_value
from tokend.secrets.cipher import Cipher

logger = logging.getLogger(__name__)

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

# The GCM tag is 16 bytes; the plaintext is the rest.
_DESCRIBE = """
SELECT key_id, octet_length(ciphertext) - 16 AS size, updated_at
FROM tokend_secrets WHERE tenant = $1 AND name = $2
"""


class PostgresSecretStore:
    """Secrets encrypted in the `tokend_secrets` table."""

    backend = "postgres"

    def __init__(self, pool: asyncpg.Pool | Conn, cipher: Cipher) -> None:
        # A pool for the daemon; one connection will do for tools and seeding.
        self._pool = pool
        self.cipher = cipher

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]:
        wanted = [(tenant, check_name(name)) for tenant, name in keys]
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
        check_value(value)
        key_id, nonce, sealed = self.cipher.encrypt(tenant, check_name(name), value)
        if conn is None:
            await self._pool.execute(_WRITE, tenant, name, key_id, nonce, sealed)
        else:
            await conn.execute(_WRITE, tenant, name, key_id, nonce, sealed)

    async def describe(self, tenant: UUID, name: str) -> SecretInfo | None:
        row = await self._pool.fetchrow(_DESCRIBE, tenant, check_name(name))
        if row is None:
            return None
        key_id = row["key_id"]
        known = "" if key_id in self.cipher.key_ids else " (not configured)"
        return SecretInfo(
            size=row["size"],
            updated_at=row["updated_at"].timestamp(),
            details={"key_id": key_id + known},
        )

    def reload(self, config: SecretsConfig) -> list[str]:
        if config.backend != self.backend:
            return ["secrets.backend"]
        # New keys apply at once: the first step of a rotation is a reload.
        self.cipher = Cipher.from_config(config)
        return []

    async def aclose(self) -> None:
        """The pool belongs to the caller."""


def postgres_store(
    config: SecretsConfig, pool: asyncpg.Pool | Conn
) -> PostgresSecretStore:
    return PostgresSecretStore(pool, Cipher.from_config(config))


# -- key rotation ---------------------------------------------------------

# Keyset order over the primary key; rows a refresh holds are skipped now
# and taken by a later pass, so rotating never waits on a refresh.
_BATCH = """
SELECT tenant, name, key_id, nonce, ciphertext FROM tokend_secrets
WHERE key_id <> $1 AND (tenant, name) > ($2::uuid, $3::text)
ORDER BY tenant, name
LIMIT $4
FOR UPDATE SKIP LOCKED
"""

_REWRITE = """
UPDATE tokend_secrets AS s
SET key_id = $1, nonce = u.nonce, ciphertext = u.ciphertext
FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::bytea[])
    AS u(tenant, name, nonce, ciphertext)
WHERE s.tenant = u.tenant AND s.name = u.name
"""

_LEFT = "SELECT count(*) FROM tokend_secrets WHERE key_id <> $1"


@dataclass
class Rotation:
    """What one `rotate-key` run did."""

    key_id: str
    rotated: int = 0
    batches: int = 0
    # Rows that did not open, by (tenant, name): the failure's message.
    unopened: dict[SecretKey, str] = field(default_factory=dict)
    left: int = 0

    def unopened_by_code(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for message in self.unopened.values():
            counts[message] = counts.get(message, 0) + 1
        return counts


async def rotate(
    conn: Conn,
    cipher: Cipher,
    *,
    batch: int = 500,
    wait_s: float = 10.0,
) -> Rotation:
    """Re-encrypt every row not sealed with the current key, in batches.

    Each batch is its own short transaction, so the work done survives an
    interruption and a second run resumes where the first stopped. Rows
    locked by a refresh, or written meanwhile with an older key, are
    retried by further passes for up to `wait_s`; what is still left then
    is reported in `left`.
    """
    report = Rotation(cipher.current)
    deadline = time.monotonic() + wait_s
    while True:
        await _pass(conn, cipher, batch, report)
        remaining = await conn.fetchval(_LEFT, cipher.current)
        report.left = remaining - len(report.unopened)
        if report.left <= 0 or time.monotonic() >= deadline:
            return report
        await anyio.sleep(0.2)


async def _pass(conn: Conn, cipher: Cipher, batch: int, report: Rotation) -> None:
    after: SecretKey = (APP, "")
    while True:
        async with conn.transaction():
            rows = await conn.fetch(_BATCH, cipher.current, *after, batch)
            if not rows:
                return
            columns = _reencrypt(cipher, rows, report)
            await conn.execute(_REWRITE, cipher.current, *columns)
        report.rotated += len(columns[0])
        report.batches += 1
        logger.info(
            "secrets re-encrypted",
            extra={"rows": len(columns[0]), "key_id": cipher.current},
        )
        after = (rows[-1]["tenant"], rows[-1]["name"])
        if len(rows) < batch:
            return


def _reencrypt(
    cipher: Cipher, rows: list[asyncpg.Record], report: Rotation
) -> tuple[list[UUID], list[str], list[bytes], list[bytes]]:
    tenants: list[UUID] = []
    names: list[str] = []
    nonces: list[bytes] = []
    sealed: list[bytes] = []
    for r in rows:
        tenant, name = r["tenant"], r["name"]
        try:
            value = cipher.decrypt(
                tenant, name, r["key_id"], r["nonce"], r["ciphertext"]
            )
        except SecretUnavailable as exc:
            report.unopened[(tenant, name)] = f"{exc.code} (key id {r['key_id']!r})"
            continue
        _, nonce, ciphertext = cipher.encrypt(tenant, name, value)
        tenants.append(tenant)
        names.append(name)
        nonces.append(nonce)
        sealed.append(ciphertext)
    return tenants, names, nonces, sealed
