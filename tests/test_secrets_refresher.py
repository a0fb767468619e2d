"""The main job on the files and Vault stores, and what a secret store that
cannot answer does to an integration: it waits with backoff and alerts,
never reconnect-required, never a hot loop, and heals by itself."""

from __future__ import annotations

import base64
import logging
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.bao import ROOT_TOKEN, Bao
from tests.helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    SECRET_KEY,
    Process,
    World,
    config_doc,
    eventually,
    running,
    write_config,
)
from tests.stores import files_secrets, vault_secrets
from tokend import daemon as daemon_module
from tokend import metrics
from tokend.config import Config
from tokend.credentials import Credentials
from tokend.errors import SecretUnavailable
from tokend.lifecycle import parse_iso
from tokend.secrets import APP, SecretStore, open_store
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio

CREDENTIALS = "ninjaone_credentials"


@pytest.fixture
def own_bao(tmp_path: Path) -> Iterator[Bao]:
    server = Bao(tmp_path / "bao").start()
    try:
        yield server
    finally:
        server.stop()


async def seed_clients(store: SecretStore) -> None:
    await store.put(APP, "ninjaone_client_id", CLIENT_ID.encode())
    await store.put(APP, "ninjaone_client_secret", CLIENT_SECRET.encode())


def fresh_credentials(world: World, expires_in_s: float = 3600) -> Credentials:
    grant = world.endpoint.grant(CLIENT_ID)
    expires_ms = int((time.time() + expires_in_s) * 1000)
    return Credentials(
        grant["access_token"],
        grant["refresh_token"],
        expires_ms,
        world.endpoint.url,
        {},
    )


async def connect(
    world: World, store: SecretStore, credentials: Credentials | None
) -> IntegrationKey:
    """The host app's connect, with credentials in `store` (not Postgres)."""
    key = await world.connect(credentials=b"", notify=False)
    if credentials is not None:
        await store.put(key.tenant, CREDENTIALS, credentials.dumps())
    await world.notify("connected", key)
    return key


async def lifecycle_where(world: World, key: IntegrationKey, **want: Any) -> Any:
    async def probe() -> dict[str, Any] | None:
        doc = await world.lifecycle(key)
        if doc and all(doc.get(k) == v for k, v in want.items()):
            return doc
        return None

    return await eventually(probe, timeout_s=20)


async def failure_code(world: World, key: IntegrationKey, code: str) -> Any:
    async def probe() -> dict[str, Any] | None:
        doc = await world.lifecycle(key)
        failure = doc and doc.get("lastRefreshFailure")
        return doc if failure and failure["code"] == code else None

    return await eventually(probe, timeout_s=20)


async def stored(store: SecretStore, key: IntegrationKey) -> Credentials:
    found = await store.get_many([(key.tenant, CREDENTIALS)])
    return Credentials.parse(found[(key.tenant, CREDENTIALS)])


def vault_config(world: World, bao: Bao, **more: Any) -> Config:
    return world.config(secrets=vault_secrets(bao, **more))


async def test_the_main_job_on_the_host_apps_files(
    world: World, tmp_path: Path
) -> None:
    base = tmp_path / "host-secrets"
    base.mkdir()
    config = world.config(secrets=files_secrets(base))
    store = open_store(config, None)
    await seed_clients(store)
    async with running(config):
        key = await connect(world, store, fresh_credentials(world))
        await lifecycle_where(
            world, key, lastScheduleSource="proactive_refresh_success"
        )
    path = base / "tenants" / str(key.tenant) / CREDENTIALS
    rotated = Credentials.parse(path.read_bytes())
    assert rotated.refresh_token == world.refreshes()[0].new_refresh_token
    assert path.stat().st_mode & 0o777 == 0o600


async def test_a_sealed_vault_makes_the_integration_wait_then_heal(
    world: World, own_bao: Bao
) -> None:
    config = vault_config(world, own_bao)
    store = open_store(config, None)
    await seed_clients(store)
    errors = metrics.secret_store_errors.labels("vault", "secret_store_sealed")
    errors_before = errors._value.get()
    try:
        async with running(config):
            key = await connect(world, store, fresh_credentials(world))
            await lifecycle_where(
                world, key, lastScheduleSource="proactive_refresh_success"
            )
            own_bao.seal()
            sealed_at = time.monotonic()
            waiting = await failure_code(world, key, "secret_store_sealed")
            assert waiting["status"] == "retrying"
            assert waiting["reconnectRequired"] is False
            calls = len(world.endpoint.log)
            await anyio.sleep(3)
            during = await world.lifecycle(key)
            assert during is not None and during["status"] == "retrying"
            elapsed = time.monotonic() - sealed_at
            # Backoff from 0.5 s doubling to 2 s: a handful of attempts, and
            # none reaches the token endpoint without its secrets.
            assert during["consecutiveFailures"] <= 2 + elapsed / 0.25
            assert len(world.endpoint.log) == calls

            own_bao.unseal()
            healed = await lifecycle_where(
                world, key, status="scheduled", consecutiveFailures=0
            )
            assert healed["reconnectRequired"] is False
            await eventually(lambda: len(world.refreshes()) >= 2, timeout_s=20)
        events = [e["type"] for e in await world.events(key)]
        failed = [
            e
            for e in await world.events(key)
            if e["type"] == "INTEGRATION_TOKEN_REFRESH_FAILED"
        ]
        assert failed and failed[0]["error_code"] == "secret_store_sealed"
        assert failed[0]["retryable"] is True
        assert "INTEGRATION_TOKEN_RECOVERED" in events
        assert "INTEGRATION_RECONNECT_REQUIRED" not in events
        assert errors._value.get() > errors_before
        latest = await stored(store, key)
        assert world.endpoint.refresh_token_valid(latest.refresh_token)
    finally:
        await store.aclose()


async def test_a_store_down_at_connect_waits_then_schedules(
    world: World, tmp_path: Path
) -> None:
    base = tmp_path / "not-mounted-yet"
    config = world.config(secrets=files_secrets(base))
    async with running(config):
        key = await connect(world, open_store(config, None), credentials=None)
        waiting = await failure_code(world, key, "secret_store_unreadable")
        assert waiting["status"] == "retrying"
        assert str(base) in waiting["lastRefreshFailure"]["message"]

        base.mkdir()
        store = open_store(config, None)
        await seed_clients(store)
        credentials = fresh_credentials(world, expires_in_s=7200)
        await store.put(key.tenant, CREDENTIALS, credentials.dumps())
        # The retry finds credentials it never scheduled for: it schedules
        # from them (an hour away) instead of refreshing a fresh token now.
        healed = await lifecycle_where(world, key, status="scheduled")
        assert healed["consecutiveFailures"] == 0
        assert healed["lastScheduleSource"] == "resync"
        assert parse_iso(healed["expiresAt"], "") == credentials.expires_at
        assert parse_iso(healed["nextRefreshAt"], "") > time.time() + 3000
        assert world.endpoint.log == []


async def test_rotated_credentials_that_cannot_be_stored_wait_and_say_so(
    world: World, bao: Bao, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"ro{uuid.uuid4().hex[:8]}"
    token = bao.token(
        f'path "secret/data/{prefix}/*" {{ capabilities = ["read"] }}',
        name=f"read-only-{prefix}",
    )
    writer = open_store(vault_config(world, bao, prefix=prefix), None)
    await seed_clients(writer)
    config = vault_config(world, bao, prefix=prefix, token=token)
    with caplog.at_level(logging.ERROR, logger="tokend.refresher"):
        async with running(config):
            key = await connect(world, writer, fresh_credentials(world))
            await eventually(lambda: world.events(key))
    # The rotated token set waits in the journal for the store (see
    # docs/reliability.md); the first outcome is a wait, never a reconnect.
    first = (await world.events(key))[0]
    assert first["type"] == "INTEGRATION_TOKEN_REFRESH_FAILED"
    assert first["error_code"] == "secret_store_denied"
    assert first["retryable"] is True
    assert "403" in first["error_message"]
    assert any(
        r.getMessage() == "rotated credentials could not be stored"
        for r in caplog.records
    )
    await writer.aclose()


class _FailsOnce:
    """A store whose get_many fails once, at the chosen call."""

    def __init__(self, inner: SecretStore, fail_at: int) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.calls = 0
        self.fail_at = fail_at

    async def get_many(self, keys: Any, *, conn: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise SecretUnavailable("store away", code="secret_store_unavailable")
        return await self.inner.get_many(keys, conn=conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_rejected_refresh_is_not_reconnect_required_when_the_recheck_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rejected token is re-read to see whether someone else rotated it;
    # if the store cannot say, the integration waits instead.
    wrappers: list[_FailsOnce] = []

    def flaky(config: Config, pool: Any) -> SecretStore:
        # Call 1: `connected`; call 2: the refresh; call 3: the re-check.
        wrapper = _FailsOnce(open_store(config, pool), fail_at=3)
        wrappers.append(wrapper)
        return wrapper  # type: ignore[return-value]

    monkeypatch.setattr(daemon_module, "open_store", flaky)
    unknown = Credentials("at", "rt-never-issued", int(time.time() * 1000) + 3600_000,
                          world.endpoint.url, {})  # fmt: skip
    async with running(world.config()):
        key = await world.connect(credentials=unknown.dumps())
        # The next attempt reads fine, is rejected again, and only then is
        # the integration marked for reconnect.
        await lifecycle_where(world, key, status="reconnect_required")
    events = [(e["type"], e["error_code"]) for e in await world.events(key)]
    assert events == [
        ("INTEGRATION_TOKEN_REFRESH_FAILED", "secret_store_unavailable"),
        ("INTEGRATION_RECONNECT_REQUIRED", "invalid_grant"),
    ]
    assert [e.result for e in world.endpoint.log] == ["invalid_grant"] * 2


async def test_sighup_rereads_the_vault_token_file(
    world: World, bao: Bao, tmp_path: Path
) -> None:
    prefix = f"hup{uuid.uuid4().hex[:8]}"
    policy = f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read", "update"] }}'  # noqa: E501
    first = bao.token(policy, name=f"rw-{prefix}")
    second = bao.token(policy, name=f"rw-{prefix}")
    token_file = tmp_path / "vault-token"
    token_file.write_text(first + "\n")
    secrets = vault_secrets(bao, prefix=prefix)
    del secrets["vault"]["token"]
    secrets["vault"]["token_file"] = str(token_file)
    doc = config_doc(world.dsn, secrets=secrets)
    path = write_config(tmp_path / "tokend.toml", doc)
    store = open_store(world.config(secrets=vault_secrets(bao, prefix=prefix)), None)
    await seed_clients(store)

    process = Process(path, tmp_path / "tokend.log").start()
    try:
        key = await connect(world, store, fresh_credentials(world))
        await lifecycle_where(
            world, key, lastScheduleSource="proactive_refresh_success"
        )
        bao.revoke(first)
        await failure_code(world, key, "secret_store_denied")

        token_file.write_text(second + "\n")
        process.signal(signal.SIGHUP)
        await lifecycle_where(world, key, status="scheduled", consecutiveFailures=0)
        await eventually(lambda: "vault token reloaded" in _messages(process))
    finally:
        process.stop()
        await store.aclose()
    text = (tmp_path / "tokend.log").read_text()
    for token in (first, second, ROOT_TOKEN):
        assert token not in text


def _messages(process: Process) -> list[str]:
    return [line.get("message", "") for line in process.log_lines()]


async def test_rotate_key_while_the_daemon_refreshes(
    world: World, tmp_path: Path
) -> None:
    # The daemon was reloaded with k2 as the current key and k1 still known;
    # rows move from k1 to k2, one a transaction, while refreshes rewrite
    # the same rows.
    keys = [await world.connect() for _ in range(12)]
    new_key = base64.b64encode(b"2" * 32).decode()
    secrets = {"key": new_key, "key_id": "k2", "old_keys": {"k1": {"key": SECRET_KEY}}}
    doc = config_doc(world.dsn, secrets=secrets)
    path = write_config(tmp_path / "tokend.toml", doc)
    async with running(world.config(secrets=secrets)):
        await eventually(lambda: len(world.refreshes()) >= 12, timeout_s=20)
        before = len(world.refreshes())
        result = await anyio.run_process(
            [sys.executable, "-m", "tokend", "secrets", "rotate-key",
             "-c", str(path), "--batch", "1"],
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        await eventually(lambda: len(world.refreshes()) >= before + 12, timeout_s=20)

    ids = await world.conn.fetch("SELECT DISTINCT key_id FROM tokend_secrets")
    assert [r["key_id"] for r in ids] == ["k2"]
    only_k2 = world.config(secrets={"key": new_key, "key_id": "k2"})
    new_store = open_store(only_k2, world.conn)
    for key in keys:
        lifecycle = await world.lifecycle(key)
        assert lifecycle and lifecycle["status"] == "scheduled", lifecycle
        current = await stored(new_store, key)
        assert world.endpoint.refresh_token_valid(current.refresh_token)
    assert [r for r in world.endpoint.log if r.result != "ok"] == []


async def test_a_store_outage_near_expiry_sends_the_expiring_alert(
    world: World, tmp_path: Path
) -> None:
    base = tmp_path / "host-secrets"
    base.mkdir()
    # Two seconds between the schedule and the refresh, to unmount in.
    config = world.config(secrets=files_secrets(base), scheduler={"min_delay_s": 2.0})
    store = open_store(config, None)
    await seed_clients(store)
    async with running(config):
        key = await connect(world, store, fresh_credentials(world, expires_in_s=120))
        await lifecycle_where(world, key, status="scheduled")
        # The folder goes away (an unmounted volume) before the refresh.
        base.rename(tmp_path / "unmounted")
        await eventually(lambda: _has_event(world, key, "INTEGRATION_TOKEN_EXPIRING"))
        (tmp_path / "unmounted").rename(base)
        await eventually(lambda: _has_event(world, key, "INTEGRATION_TOKEN_RECOVERED"))
    failed = [e for e in await world.events(key) if e["type"].endswith("FAILED")]
    assert {e["error_code"] for e in failed} == {"secret_store_unreadable"}
    expiring = await _has_event(world, key, "INTEGRATION_TOKEN_EXPIRING")
    assert expiring["error_code"] == "secret_store_unreadable"


async def _has_event(world: World, key: IntegrationKey, kind: str) -> Any:
    found = [e for e in await world.events(key) if e["type"] == kind]
    return found[0] if found else None
