"""The Vault store's own failures, against a real OpenBao server (and, for
answers a healthy server never gives, a small misbehaving one)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.bao import ROOT_TOKEN, Bao
from tests.stores import config_with, vault_secrets
from tokend.errors import ConfigErrors, SecretConflict, SecretError, SecretUnavailable
from tokend.secrets import APP
from tokend.secrets.vault import VaultSecretStore

pytestmark = pytest.mark.anyio


def vault(bao: Bao, **more: Any) -> VaultSecretStore:
    config = config_with(vault_secrets(bao, **more))
    return VaultSecretStore(config.secrets.vault)


@pytest.fixture
async def store(bao: Bao) -> AsyncIterator[VaultSecretStore]:
    opened = vault(bao)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def own_bao(tmp_path: Path) -> Iterator[Bao]:
    """A server of the test's own, for tests that seal it."""
    server = Bao(tmp_path / "bao").start()
    try:
        yield server
    finally:
        server.stop()


def tenant_path(store: VaultSecretStore, tenant: uuid.UUID, name: str) -> str:
    return store.path(tenant, name)


async def test_secrets_sit_where_the_paths_say(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    await store.put(t, "ninjaone_credentials", b'{"a": 1}')
    await store.put(APP, "ninjaone_client_id", b"cid")
    prefix = store.config.app_path.removesuffix("/app")
    status, doc = bao.read(f"{prefix}/tenants/{t}/ninjaone_credentials")
    assert status == 200
    assert doc["data"]["data"] == {"value": '{"a": 1}'}
    status, doc = bao.read(f"{prefix}/app/ninjaone_client_id")
    assert doc["data"]["data"] == {"value": "cid"}


async def test_a_concurrent_writer_is_detected_not_overwritten(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    path = tenant_path(store, t, "ninjaone_credentials")
    bao.write(path, {"value": "v1"})
    assert await store.get_many([(t, "ninjaone_credentials")])
    bao.write(path, {"value": "host app wrote this"})

    with pytest.raises(SecretConflict, match="changed since version 1") as caught:
        await store.put(t, "ninjaone_credentials", b"tokend's")
    assert caught.value.code == "secret_write_conflict"
    _, doc = bao.read(path)
    assert doc["data"]["data"]["value"] == "host app wrote this"

    # Read again, and the write goes through on top of the latest version.
    await store.get_many([(t, "ninjaone_credentials")])
    await store.put(t, "ninjaone_credentials", b"tokend's")
    _, doc = bao.read(path)
    assert doc["data"]["data"]["value"] == "tokend's"
    assert doc["data"]["metadata"]["version"] == 3


async def test_two_writers_after_one_read_only_one_wins(bao: Bao) -> None:
    first = vault(bao, prefix="race")
    second = vault(bao, prefix="race")
    t = uuid.uuid4()
    try:
        await first.put(t, "ninjaone_credentials", b"v1")
        await first.get_many([(t, "ninjaone_credentials")])
        await second.get_many([(t, "ninjaone_credentials")])
        await first.put(t, "ninjaone_credentials", b"first")
        with pytest.raises(SecretConflict):
            await second.put(t, "ninjaone_credentials", b"second")
        found = await second.get_many([(t, "ninjaone_credentials")])
        assert found[(t, "ninjaone_credentials")] == b"first"
    finally:
        await first.aclose()
        await second.aclose()


async def test_creating_a_secret_someone_else_just_created_is_a_conflict(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    assert await store.get_many([(t, "new")]) == {}
    bao.write(tenant_path(store, t, "new"), {"value": "theirs"})
    with pytest.raises(SecretConflict):
        await store.put(t, "new", b"ours")


async def test_other_keys_of_the_secret_are_kept(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    path = tenant_path(store, t, "ninjaone_credentials")
    bao.write(path, {"value": "old", "owner": "host-app", "rotated": 3})
    await store.put(t, "ninjaone_credentials", b"new")
    _, doc = bao.read(path)
    assert doc["data"]["data"] == {"value": "new", "owner": "host-app", "rotated": 3}


async def test_a_json_object_value_is_read_as_json_and_written_back_as_one(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    path = tenant_path(store, t, "ninjaone_credentials")
    bao.write(path, {"value": {"access_token": "a", "expires_at": 5}})
    found = await store.get_many([(t, "ninjaone_credentials")])
    assert found[(t, "ninjaone_credentials")] == b'{"access_token":"a","expires_at":5}'
    await store.put(t, "ninjaone_credentials", b'{"access_token": "b"}')
    _, doc = bao.read(path)
    assert doc["data"]["data"]["value"] == {"access_token": "b"}


async def test_a_secret_without_the_configured_key_is_an_error_naming_it(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    bao.write(tenant_path(store, t, "ninjaone_credentials"), {"token": "x"})
    with pytest.raises(SecretError, match="no key 'value'"):
        await store.get_many([(t, "ninjaone_credentials")])


async def test_a_deleted_secret_is_missing_and_can_be_written_again(
    store: VaultSecretStore, bao: Bao
) -> None:
    t = uuid.uuid4()
    path = tenant_path(store, t, "ninjaone_credentials")
    bao.write(path, {"value": "v1"})
    bao.ok("DELETE", f"secret/data/{path}")
    assert await store.get_many([(t, "ninjaone_credentials")]) == {}
    await store.put(t, "ninjaone_credentials", b"v2")
    _, doc = bao.read(path)
    assert doc["data"]["data"]["value"] == "v2"
    assert doc["data"]["metadata"]["version"] == 2


async def test_a_bad_token_is_denied_never_missing(bao: Bao) -> None:
    store = vault(bao, token="not-a-real-token")
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await store.get_many([(uuid.uuid4(), "ninjaone_credentials")])
    finally:
        await store.aclose()
    assert caught.value.code == "secret_store_denied"
    assert "403" in str(caught.value)
    assert "not-a-real-token" not in str(caught.value)


async def test_a_read_only_policy_reads_but_cannot_write(bao: Bao) -> None:
    prefix = f"ro{uuid.uuid4().hex[:8]}"
    token = bao.token(
        f'path "secret/data/{prefix}/*" {{ capabilities = ["read"] }}',
        name=f"read-only-{prefix}",
    )
    store = vault(bao, prefix=prefix, token=token)
    t = uuid.uuid4()
    bao.write(f"{prefix}/tenants/{t}/ninjaone_credentials", {"value": "v1"})
    try:
        found = await store.get_many([(t, "ninjaone_credentials")])
        assert found == {(t, "ninjaone_credentials"): b"v1"}
        with pytest.raises(SecretUnavailable) as caught:
            await store.put(t, "ninjaone_credentials", b"v2")
    finally:
        await store.aclose()
    assert caught.value.code == "secret_store_denied"


async def test_a_sealed_vault_makes_callers_wait_until_unsealed(
    own_bao: Bao,
) -> None:
    store = vault(own_bao)
    t = uuid.uuid4()
    try:
        await store.put(t, "ninjaone_credentials", b"v1")
        own_bao.seal()
        with pytest.raises(SecretUnavailable) as reading:
            await store.get_many([(t, "ninjaone_credentials")])
        with pytest.raises(SecretUnavailable) as writing:
            await store.put(t, "ninjaone_credentials", b"v2")
        own_bao.unseal()
        found = await store.get_many([(t, "ninjaone_credentials")])
    finally:
        await store.aclose()
    assert reading.value.code == writing.value.code == "secret_store_sealed"
    assert "503" in str(reading.value)
    assert found == {(t, "ninjaone_credentials"): b"v1"}


async def test_a_wrong_mount_is_misconfigured_not_missing(bao: Bao) -> None:
    store = vault(bao, mount="no-such-mount")
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await store.get_many([(uuid.uuid4(), "ninjaone_credentials")])
    finally:
        await store.aclose()
    assert caught.value.code == "secret_store_misconfigured"
    assert "mount" in str(caught.value)


async def test_a_namespace_is_sent_and_kept_apart(bao: Bao) -> None:
    namespace = f"team{uuid.uuid4().hex[:6]}"
    bao.namespace(namespace)
    bao.mount_kv("kv", namespace=namespace)
    inside = vault(bao, namespace=namespace, mount="kv")
    outside = vault(bao, mount="kv")
    t = uuid.uuid4()
    try:
        await inside.put(t, "ninjaone_credentials", b"in the namespace")
        status, doc = bao.api(
            "GET",
            f"kv/data/{inside.path(t, 'ninjaone_credentials')}",
            namespace=namespace,
        )
        assert status == 200 and doc["data"]["data"]["value"] == "in the namespace"
        with pytest.raises(SecretUnavailable) as caught:
            await outside.get_many([(t, "ninjaone_credentials")])
    finally:
        await inside.aclose()
        await outside.aclose()
    assert caught.value.code == "secret_store_misconfigured"


async def test_nothing_listening_is_unavailable(bao: Bao) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = VaultSecretStore(
        config_with(
            vault_secrets(bao, address=f"http://127.0.0.1:{port}")
        ).secrets.vault
    )
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await store.get_many([(uuid.uuid4(), "x")])
    finally:
        await store.aclose()
    assert caught.value.code == "secret_store_unavailable"


async def test_a_server_that_never_answers_times_out(bao: Bao) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = VaultSecretStore(
            config_with(
                vault_secrets(bao, address=address, timeout_s=0.3)
            ).secrets.vault
        )
        try:
            with anyio.fail_after(5), pytest.raises(SecretUnavailable) as caught:
                await store.get_many([(uuid.uuid4(), "x")])
        finally:
            await store.aclose()
    assert caught.value.code == "secret_store_unavailable"
    assert "timed out" in str(caught.value)


@pytest.fixture
async def misbehaving() -> AsyncIterator[tuple[str, list[tuple[int, str]]]]:
    """An HTTP server answering each request with the next (status, body)."""
    answers: list[tuple[int, str]] = []

    async def handle(request: web.Request) -> web.Response:
        status, body = answers.pop(0)
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", answers
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (500, '{"errors": ["internal error"]}', "secret_store_unavailable"),
        (502, "<html>bad gateway</html>", "secret_store_unavailable"),
        (429, '{"errors": ["rate limited"]}', "secret_store_unavailable"),
        (503, '{"errors": ["Vault is sealed"]}', "secret_store_sealed"),
        (404, "<html>not found</html>", "secret_store_misconfigured"),
        (307, "", "secret_store_misconfigured"),
    ],
)
async def test_answers_map_to_clear_outcomes(
    bao: Bao,
    misbehaving: tuple[str, list[tuple[int, str]]],
    status: int,
    body: str,
    code: str,
) -> None:
    address, answers = misbehaving
    answers.append((status, body))
    store = VaultSecretStore(
        config_with(vault_secrets(bao, address=address)).secrets.vault
    )
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await store.get_many([(uuid.uuid4(), "x")])
    finally:
        await store.aclose()
    assert caught.value.code == code
    assert str(status) in str(caught.value)


async def test_a_reloaded_token_is_used_at_once(bao: Bao) -> None:
    prefix = f"rl{uuid.uuid4().hex[:8]}"
    policy = f'path "secret/data/{prefix}/*" {{ capabilities = ["read"] }}'
    old = bao.token(policy, name=f"p-{prefix}")
    new = bao.token(policy, name=f"p-{prefix}")
    store = vault(bao, prefix=prefix, token=old)
    t = uuid.uuid4()
    try:
        assert await store.get_many([(t, "x")]) == {}
        bao.revoke(old)
        with pytest.raises(SecretUnavailable, match="403"):
            await store.get_many([(t, "x")])
        reloaded = config_with(vault_secrets(bao, prefix=prefix, token=new))
        assert store.reload(reloaded.secrets) == []
        assert await store.get_many([(t, "x")]) == {}
    finally:
        await store.aclose()


async def test_a_reload_that_moves_the_secrets_needs_a_restart(
    store: VaultSecretStore, bao: Bao
) -> None:
    app_path = store.config.app_path
    moved = config_with(vault_secrets(bao, mount="elsewhere", timeout_s=3.0))
    assert store.reload(moved.secrets) == [
        "secrets.vault.mount",
        "secrets.vault.app_path",
        "secrets.vault.tenant_path",
    ]
    assert store.config.mount == "secret"
    assert store.config.app_path == app_path
    assert store.config.timeout_s == 3.0


async def test_tls_with_the_configured_ca(tmp_path: Path) -> None:
    server = Bao(tmp_path / "tls", tls=True).start()
    try:
        trusted = vault(server, ca_file=str(server.ca_file))
        untrusted = vault(server)
        t = uuid.uuid4()
        try:
            await trusted.put(t, "ninjaone_credentials", b"over tls")
            found = await trusted.get_many([(t, "ninjaone_credentials")])
            assert found == {(t, "ninjaone_credentials"): b"over tls"}
            with pytest.raises(SecretUnavailable) as caught:
                await untrusted.get_many([(t, "ninjaone_credentials")])
        finally:
            await trusted.aclose()
            await untrusted.aclose()
    finally:
        server.stop()
    assert caught.value.code == "secret_store_unavailable"


@pytest.mark.parametrize(
    ("vault_settings", "key", "problem"),
    [
        ({"address": "http://vault.example:8200"}, "address", "loopback"),
        ({"address": "https://h:8200/v1"}, "address", "scheme, host and port"),
        ({"tenant_path": "tenants"}, "tenant_path", "{tenantId}"),
        ({"app_path": "a/../b"}, "app_path", "a/b/c"),
        ({"ca_file": "relative.pem"}, "ca_file", "absolute"),
        ({"bogus": 1}, "bogus", "unknown key"),
    ],
)
def test_bad_vault_settings_name_the_key(
    bao: Bao, vault_settings: dict[str, Any], key: str, problem: str
) -> None:
    secrets = vault_secrets(bao)
    secrets["vault"].update(vault_settings)
    with pytest.raises(ConfigErrors) as caught:
        config_with(secrets)
    assert f"secrets.vault.{key}" in str(caught.value)
    assert problem in str(caught.value)


def test_vault_needs_an_address_and_a_token() -> None:
    with pytest.raises(ConfigErrors) as caught:
        config_with({"backend": "vault"})
    text = str(caught.value)
    assert "secrets.vault.address: required for backend vault" in text
    assert "secrets.vault.token: required for backend vault" in text
    assert ROOT_TOKEN not in text
