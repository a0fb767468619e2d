"""One contract, three stores: every test here runs against the Postgres
store, the files store and the Vault store (a real OpenBao server)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import orjson
import pytest

from tests.bao import Bao
from tests.helpers import make_config
from tests.stores import config_with, files_secrets, vault_secrets
from tokend.errors import SecretError
from tokend.secrets import APP, MAX_VALUE_BYTES, SecretStore, open_store

pytestmark = pytest.mark.anyio

CREDENTIALS = orjson.dumps(
    {
        "access_token": "at-ü-1",
        "refresh_token": "rt-1",
        "expires_at": 1_900_000_000_000,
        "instance_url": "https://eu.ninjarmm.com",
    }
)


@pytest.fixture
async def postgres_store(dsn: str) -> AsyncIterator[SecretStore]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    store = open_store(make_config(dsn), pool)
    try:
        yield store
    finally:
        await store.aclose()
        await pool.close()


@pytest.fixture
async def files_store(tmp_path: Path) -> AsyncIterator[SecretStore]:
    base = tmp_path / "secrets"
    base.mkdir()
    store = open_store(config_with(files_secrets(base)), None)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def vault_store(bao: Bao) -> AsyncIterator[SecretStore]:
    store = open_store(config_with(vault_secrets(bao)), None)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(params=["postgres", "files", "vault"])
def store(request: pytest.FixtureRequest) -> SecretStore:
    found: SecretStore = request.getfixturevalue(f"{request.param}_store")
    return found


def tenant() -> uuid.UUID:
    return uuid.uuid4()


async def test_a_missing_secret_is_absent(store: SecretStore) -> None:
    t = tenant()
    assert await store.get_many([(t, "ninjaone_credentials")]) == {}
    assert await store.describe(t, "ninjaone_credentials") is None


async def test_put_then_get_round_trips(store: SecretStore) -> None:
    t = tenant()
    await store.put(t, "ninjaone_credentials", CREDENTIALS)
    await store.put(APP, "ninjaone_client_id", "client-ïd".encode())
    found = await store.get_many(
        [(t, "ninjaone_credentials"), (APP, "ninjaone_client_id")]
    )
    assert found == {
        (t, "ninjaone_credentials"): CREDENTIALS,
        (APP, "ninjaone_client_id"): "client-ïd".encode(),
    }


async def test_app_and_tenant_secrets_do_not_mix(store: SecretStore) -> None:
    first, second = tenant(), tenant()
    await store.put(APP, "shared_name", b"app")
    await store.put(first, "shared_name", b"first")
    await store.put(second, "shared_name", b"second")
    keys = [(APP, "shared_name"), (first, "shared_name"), (second, "shared_name")]
    found = await store.get_many(keys)
    assert [found[k] for k in keys] == [b"app", b"first", b"second"]


async def test_a_second_put_replaces_the_value(store: SecretStore) -> None:
    t = tenant()
    await store.put(t, "ninjaone_credentials", b'{"v": 1}')
    await store.put(t, "ninjaone_credentials", b'{"v": 2}')
    found = await store.get_many([(t, "ninjaone_credentials")])
    assert found == {(t, "ninjaone_credentials"): b'{"v": 2}'}


async def test_get_many_gives_what_exists_and_only_that(store: SecretStore) -> None:
    t = tenant()
    await store.put(t, "ninjaone_credentials", CREDENTIALS)
    await store.put(APP, "ninjaone_client_secret", b"app-secret")
    wanted = [
        (t, "ninjaone_credentials"),
        (t, "ninjaone_client_id"),
        (t, "ninjaone_client_secret"),
        (APP, "ninjaone_client_id"),
        (APP, "ninjaone_client_secret"),
        (t, "ninjaone_credentials"),
    ]
    found = await store.get_many(wanted)
    assert found == {
        (t, "ninjaone_credentials"): CREDENTIALS,
        (APP, "ninjaone_client_secret"): b"app-secret",
    }
    assert await store.get_many([]) == {}


async def test_a_large_value_round_trips(store: SecretStore) -> None:
    t = tenant()
    value = orjson.dumps({"blob": "x" * 200_000})
    await store.put(t, "big", value)
    assert await store.get_many([(t, "big")]) == {(t, "big"): value}


async def test_a_value_over_the_limit_is_refused(store: SecretStore) -> None:
    t = tenant()
    with pytest.raises(SecretError, match="over"):
        await store.put(t, "huge", b"x" * (MAX_VALUE_BYTES + 1))
    assert await store.get_many([(t, "huge")]) == {}


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\0b", "..\\x", ".hidden"],
    ids=["empty", "dot", "dotdot", "up", "slash", "absolute", "nul", "bslash", "hid"],
)
async def test_names_that_could_leave_the_store_are_refused(
    store: SecretStore, name: str
) -> None:
    t = tenant()
    with pytest.raises(SecretError, match="secret name"):
        await store.put(t, name, b"value")
    with pytest.raises(SecretError, match="secret name"):
        await store.get_many([(t, "fine"), (t, name)])
    with pytest.raises(SecretError, match="secret name"):
        await store.put(APP, name, b"value")


async def test_describe_shows_metadata_never_the_value(store: SecretStore) -> None:
    t = tenant()
    before = time.time()
    await store.put(t, "ninjaone_credentials", CREDENTIALS)
    info = await store.describe(t, "ninjaone_credentials")
    assert info is not None
    assert info.size == len(CREDENTIALS)
    assert info.updated_at is not None
    assert before - 2 <= info.updated_at <= time.time() + 2
    assert "rt-1" not in repr(info)


async def test_concurrent_writes_of_many_tenants_all_land(
    store: SecretStore,
) -> None:
    tenants = [tenant() for _ in range(20)]
    async with anyio.create_task_group() as tg:
        for t in tenants:
            tg.start_soon(store.put, t, "ninjaone_credentials", str(t).encode())
    found = await store.get_many([(t, "ninjaone_credentials") for t in tenants])
    assert found == {(t, "ninjaone_credentials"): str(t).encode() for t in tenants}


async def test_a_reload_naming_another_backend_needs_a_restart(
    store: SecretStore, tmp_path: Path
) -> None:
    other = "files" if store.backend != "files" else "postgres"
    secrets = {"backend": other, "files": {"base": str(tmp_path)}}
    assert store.reload(config_with(secrets).secrets) == ["secrets.backend"]
    t = tenant()
    await store.put(t, "still_works", b"yes")
    assert await store.get_many([(t, "still_works")]) == {(t, "still_works"): b"yes"}
