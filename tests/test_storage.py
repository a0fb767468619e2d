"""Schema, lock keys and the encrypted secret table on a real Postgres."""

from __future__ import annotations

import base64
import uuid

import asyncpg
import pytest

from tokend.errors import ConfigError, SecretUnavailable
from tokend.keys import integration_key, leader_key, lock_key
from tokend.migrate import migrate
from tokend.secrets import APP
from tokend.secrets.cipher import Cipher, decode_key
from tokend.secrets.postgres import PostgresSecretStore

pytestmark = pytest.mark.anyio


async def test_migrate_is_idempotent(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # The template already has everything: nothing more to apply.
        assert await migrate(conn, host_table=True, trigger=True) == []
        names = {
            r[0] for r in await conn.fetch("SELECT name FROM tokend_schema_version")
        }
        assert names == {"0001_core", "host_table", "active_trigger"}
    finally:
        await conn.close()


async def test_python_and_sql_lock_keys_agree(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(20):
            tenant, integration = uuid.uuid4(), uuid.uuid4()
            sql = await conn.fetchval(
                "SELECT tokend_integration_lock_key($1, $2)", tenant, integration
            )
            assert sql == integration_key(tenant, integration)
        assert await conn.fetchval("SELECT tokend_lock_key('x')") == lock_key("x")
        assert leader_key("a") != leader_key("b")
    finally:
        await conn.close()


async def test_secrets_are_sealed_and_bound_to_tenant_and_name(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    cipher = Cipher({"k1": b"a" * 32}, "k1")
    store = PostgresSecretStore(conn, cipher)
    tenant = uuid.uuid4()
    try:
        await store.put(tenant, "creds", b"value-123")
        raw = await conn.fetchval("SELECT ciphertext FROM tokend_secrets")
        assert b"value-123" not in raw
        assert await store.get(tenant, "creds") == b"value-123"
        assert await store.get(APP, "creds") is None

        # A row moved to another tenant no longer opens.
        other = uuid.uuid4()
        await conn.execute("UPDATE tokend_secrets SET tenant = $1", other)
        with pytest.raises(SecretUnavailable) as caught:
            await store.get(other, "creds")
        assert "k1" in str(caught.value) and "value" not in str(caught.value)

        wrong = PostgresSecretStore(conn, Cipher({"k2": b"b" * 32}, "k2"))
        with pytest.raises(SecretUnavailable, match="key id 'k1', which is not"):
            await wrong.get(other, "creds")
    finally:
        await conn.close()


def test_bad_keys_name_the_key_id_not_the_material() -> None:
    with pytest.raises(ConfigError, match="key 'k9' must be 32 bytes, got 5"):
        decode_key(base64.b64encode(b"short").decode(), "k9")
    with pytest.raises(ConfigError) as caught:
        decode_key("not base64 !!", "k9")
    assert "not base64 !!" not in str(caught.value)
