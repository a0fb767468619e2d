"""The Postgres store's own behaviour: joining the caller's transaction, a
keyring of several keys, and re-encrypting every row under a new key."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.helpers import (
    CLIENT_ID,
    SECRET_KEY,
    World,
    config_doc,
    make_config,
    running,
    write_config,
)
from tokend import runner
from tokend.config import load
from tokend.errors import ConfigErrors, SecretUnavailable
from tokend.secrets import APP
from tokend.secrets import postgres as postgres_module
from tokend.secrets.cipher import Cipher
from tokend.secrets.postgres import PostgresSecretStore, postgres_store, rotate

pytestmark = pytest.mark.anyio

K1 = SECRET_KEY
K2 = base64.b64encode(b"2" * 32).decode()
K3 = base64.b64encode(b"3" * 32).decode()


def keyring(current: str, key: str, **old: str) -> dict[str, Any]:
    return {
        "key": key,
        "key_id": current,
        "old_keys": {i: {"key": k} for i, k in old.items()},
    }


def store_for(dsn: str, conn: Any, secrets: dict[str, Any]) -> PostgresSecretStore:
    return postgres_store(make_config(dsn, secrets=secrets).secrets, conn)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    opened = await asyncpg.connect(dsn)
    try:
        yield opened
    finally:
        await opened.close()


async def key_ids(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT key_id, count(*) AS n FROM tokend_secrets GROUP BY key_id"
    )
    return {r["key_id"]: r["n"] for r in rows}


async def seed(
    store: PostgresSecretStore, count: int
) -> dict[tuple[uuid.UUID, str], bytes]:
    values = {}
    for i in range(count):
        key = (uuid.uuid4(), "ninjaone_credentials")
        values[key] = f"value {i}".encode()
        await store.put(*key, values[key])
    return values


async def test_a_write_in_a_rolled_back_transaction_is_gone(
    dsn: str, conn: asyncpg.Connection
) -> None:
    store = store_for(dsn, conn, keyring("k1", K1))
    t = uuid.uuid4()
    transaction = conn.transaction()
    await transaction.start()
    await store.put(t, "ninjaone_credentials", b"v", conn=conn)
    assert await store.get_many([(t, "ninjaone_credentials")], conn=conn)
    await transaction.rollback()
    assert await store.get_many([(t, "ninjaone_credentials")]) == {}


async def test_old_keys_open_old_rows_and_new_writes_use_the_current_key(
    dsn: str, conn: asyncpg.Connection
) -> None:
    before = store_for(dsn, conn, keyring("k1", K1))
    values = await seed(before, 3)
    after = store_for(dsn, conn, keyring("k2", K2, k1=K1))
    assert await after.get_many(values) == values
    t = uuid.uuid4()
    await after.put(t, "ninjaone_credentials", b"new")
    assert await key_ids(conn) == {"k1": 3, "k2": 1}
    info = await after.describe(t, "ninjaone_credentials")
    assert info is not None and info.details == {"key_id": "k2"} and info.size == 3


async def test_a_row_under_an_unknown_key_id_names_it_and_waits(
    dsn: str, conn: asyncpg.Connection
) -> None:
    old = store_for(dsn, conn, keyring("k1", K1))
    t = uuid.uuid4()
    await old.put(t, "ninjaone_credentials", b"v")
    forgot = store_for(dsn, conn, keyring("k2", K2))
    with pytest.raises(SecretUnavailable) as caught:
        await forgot.get_many([(t, "ninjaone_credentials")])
    assert caught.value.code == "secret_key_unknown"
    assert "'k1'" in str(caught.value)
    assert K1 not in str(caught.value) and K2 not in str(caught.value)
    info = await forgot.describe(t, "ninjaone_credentials")
    assert info is not None and info.details == {"key_id": "k1 (not configured)"}


async def test_a_different_key_under_the_same_id_names_the_id(
    dsn: str, conn: asyncpg.Connection
) -> None:
    t = uuid.uuid4()
    await store_for(dsn, conn, keyring("k1", K1)).put(t, "x", b"v")
    wrong = store_for(dsn, conn, keyring("k1", K3))
    with pytest.raises(
        SecretUnavailable, match="does not open with key 'k1'"
    ) as caught:
        await wrong.get_many([(t, "x")])
    assert caught.value.code == "secret_key_mismatch"


async def test_a_reload_brings_in_the_new_keyring(
    dsn: str, conn: asyncpg.Connection
) -> None:
    store = store_for(dsn, conn, keyring("k1", K1))
    values = await seed(store, 2)
    new = make_config(dsn, secrets=keyring("k2", K2, k1=K1))
    assert store.reload(new.secrets) == []
    await store.put(APP, "ninjaone_client_id", b"cid")
    assert await key_ids(conn) == {"k1": 2, "k2": 1}
    assert await store.get_many(values) == values


async def test_rotation_re_encrypts_every_row_and_a_second_run_does_nothing(
    dsn: str, conn: asyncpg.Connection
) -> None:
    values = await seed(store_for(dsn, conn, keyring("k1", K1)), 7)
    cipher = Cipher.from_config(
        make_config(dsn, secrets=keyring("k2", K2, k1=K1)).secrets
    )
    report = await rotate(conn, cipher, batch=3)
    assert (report.rotated, report.batches, report.left) == (7, 3, 0)
    assert report.unopened == {}
    assert await key_ids(conn) == {"k2": 7}
    only_k2 = store_for(dsn, conn, keyring("k2", K2))
    assert await only_k2.get_many(values) == values

    again = await rotate(conn, cipher, batch=3)
    assert (again.rotated, again.left) == (0, 0)


async def test_an_interrupted_rotation_keeps_its_batches_and_resumes(
    dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = await seed(store_for(dsn, conn, keyring("k1", K1)), 5)
    cipher = Cipher.from_config(
        make_config(dsn, secrets=keyring("k2", K2, k1=K1)).secrets
    )
    real = postgres_module._reencrypt
    calls = 0

    def dies_on_the_second_batch(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(postgres_module, "_reencrypt", dies_on_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        await rotate(conn, cipher, batch=2)
    assert await key_ids(conn) == {"k1": 3, "k2": 2}

    monkeypatch.setattr(postgres_module, "_reencrypt", real)
    report = await rotate(conn, cipher, batch=2)
    assert report.rotated == 3
    assert await key_ids(conn) == {"k2": 5}
    assert await store_for(dsn, conn, keyring("k2", K2)).get_many(values) == values


async def test_a_row_locked_by_a_refresh_is_skipped_then_taken(
    dsn: str, conn: asyncpg.Connection
) -> None:
    values = await seed(store_for(dsn, conn, keyring("k1", K1)), 4)
    locked_tenant = next(iter(values))[0]
    cipher = Cipher.from_config(
        make_config(dsn, secrets=keyring("k2", K2, k1=K1)).secrets
    )
    holder = await asyncpg.connect(dsn)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute(
            "SELECT 1 FROM tokend_secrets WHERE tenant = $1 FOR UPDATE", locked_tenant
        )
        short = await rotate(conn, cipher, batch=10, wait_s=0.3)
        assert (short.rotated, short.left) == (3, 1)

        async def release_soon() -> None:
            await anyio.sleep(0.5)
            await hold.rollback()

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            with anyio.fail_after(10):
                report = await rotate(conn, cipher, batch=10, wait_s=5)
    finally:
        await holder.close()
    assert (report.rotated, report.left) == (1, 0)
    assert await key_ids(conn) == {"k2": 4}


async def test_rows_that_do_not_open_are_reported_by_key_id_and_the_rest_rotate(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await seed(store_for(dsn, conn, keyring("k0", K3)), 2)
    await seed(store_for(dsn, conn, keyring("k1", K1)), 3)
    cipher = Cipher.from_config(
        make_config(dsn, secrets=keyring("k2", K2, k1=K1)).secrets
    )
    report = await rotate(conn, cipher, batch=2, wait_s=0.5)
    assert report.rotated == 3
    assert report.left == 0
    assert report.unopened_by_code() == {"secret_key_unknown (key id 'k0')": 2}
    assert await key_ids(conn) == {"k0": 2, "k2": 3}


@pytest.mark.parametrize(
    ("secrets", "key", "problem"),
    [
        (keyring("k2", K2, k2=K1), "secrets.old_keys.k2", "current key_id"),
        ({"old_keys": {"k0": {}}}, "secrets.old_keys.k0.key", "required"),
        ({"old_keys": {"k 0": {"key": K1}}}, "secrets.old_keys.k 0", "key id"),
        ({"old_keys": {"k0": {"key_file": "/nonexistent/k0"}}}, "k0.key_file", "read"),
        ({"old_keys": {"k0": {"key": K1, "id": 1}}}, "k0.id", "unknown key"),
        ({"old_keys": "k0"}, "secrets.old_keys", "table of keys"),
    ],
)
def test_a_bad_keyring_names_the_setting_never_the_material(
    secrets: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigErrors) as caught:
        make_config("postgresql://127.0.0.1/x", secrets=secrets)
    text = str(caught.value)
    assert key in text and problem in text
    assert len(caught.value.errors) == 1
    for material in (K1, K2):
        assert material not in text


@pytest.mark.parametrize(
    ("secrets", "problem"),
    [
        ({"key": "bm90IDMyIGJ5dGVz"}, "secrets.key: key 'k1' must be 32 bytes, got 12"),
        ({"key": "%%%", "key_id": "k7"}, "secrets.key: key 'k7' is not valid base64"),
        (
            {"old_keys": {"k0": {"key": "c2hvcnQ="}}},
            "secrets.old_keys.k0: key 'k0' must be 32 bytes, got 5",
        ),
    ],
)
def test_bad_key_material_names_the_key_id_never_the_material(
    secrets: dict[str, Any], problem: str
) -> None:
    # check-config catches it: the daemon never starts on a bad key.
    with pytest.raises(ConfigErrors) as caught:
        make_config("postgresql://127.0.0.1/x", secrets=secrets)
    assert [str(e) for e in caught.value.errors] == [problem]


def test_the_postgres_store_needs_a_key() -> None:
    from tests.helpers import config_doc
    from tokend.config import parse

    doc = config_doc("postgresql://127.0.0.1/x")
    del doc["secrets"]["key"]
    with pytest.raises(
        ConfigErrors, match=r"secrets\.key: required for backend postgres"
    ):
        parse(doc, {}, "test")


async def test_sighup_reload_brings_in_a_new_key_and_refuses_a_bad_one(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "tokend.toml"
    write_config(path, config_doc(world.dsn))
    async with running(load(path)) as daemon:
        write_config(path, config_doc(world.dsn, secrets={"key": "bm90IGEga2V5"}))
        assert await runner.reload(daemon) is False
        assert daemon.config.secrets.key == SECRET_KEY

        write_config(path, config_doc(world.dsn, secrets=keyring("k2", K2, k1=K1)))
        assert await runner.reload(daemon) is True
        assert daemon.secrets is not None
        t = uuid.uuid4()
        await daemon.secrets.put(t, "ninjaone_credentials", b"v")
        row = await world.conn.fetchval(
            "SELECT key_id FROM tokend_secrets WHERE tenant = $1", t
        )
        assert row == "k2"
        # Rows under the old key still open.
        found = await daemon.secrets.get_many([(APP, "ninjaone_client_id")])
        assert found == {(APP, "ninjaone_client_id"): CLIENT_ID.encode()}
