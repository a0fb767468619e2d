"""Providers beyond NinjaOne, end to end through a running daemon; rows whose
provider is not configured; refusal before any request."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest

from tests.helpers import CLIENT_ID, CLIENT_SECRET, World, eventually, running
from tests.oidc.harness import (
    ensure_installed,
    node_available,
    obtain_grant,
    oidc_server,
    token_active,
)
from tests.refreshing import generic_provider, refreshes_counted
from tokend.credentials import Credentials
from tokend.lifecycle import MAX_MESSAGE, iso
from tokend.metrics import REGISTRY
from tokend.secrets import APP
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio


async def _client_secrets(world: World, provider: str, secret: str) -> None:
    await world.secrets.put(APP, f"{provider}_client_id", CLIENT_ID.encode())
    await world.secrets.put(APP, f"{provider}_client_secret", secret.encode())


async def _refreshed(world: World, key: IntegrationKey) -> dict[str, Any] | None:
    doc = await world.lifecycle(key)
    source = doc and doc["lastScheduleSource"]
    return doc if source == "proactive_refresh_success" else None


async def _status(world: World, key: IntegrationKey, status: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        doc = await world.lifecycle(key)
        return doc if doc and doc["status"] == status else None

    return await eventually(probe)


async def test_generic_provider_with_a_fixed_loopback_token_url(world: World) -> None:
    url = world.endpoint.url + "/oauth/token"
    acme = generic_provider(url, client_auth="client_secret_basic", scope="read write")
    await _client_secrets(world, "acme", CLIENT_SECRET)
    counted = refreshes_counted("acme", "success")
    async with running(world.config(providers={"acme": acme})):
        # The fixed URL is used whatever the row's instance_url says.
        key = await world.connect(
            provider="acme",
            secret_name="acme_credentials",
            instance_url="https://tenant.acme.test",
        )
        sent = await world.credentials(key, "acme_credentials")
        await eventually(lambda: _refreshed(world, key))

    stored = await world.credentials(key, "acme_credentials")
    assert stored.refresh_token != sent.refresh_token
    assert world.endpoint.refresh_token_valid(stored.refresh_token)
    assert world.endpoint.access_token_valid(stored.access_token)
    assert stored.instance_url == "https://tenant.acme.test"
    request = world.endpoint.requests[0]
    assert (request.client_auth, request.scope) == ("basic", "read write")
    events = await world.events(key)
    assert [(e["type"], e["provider"]) for e in events][:1] == [
        ("INTEGRATION_TOKEN_REFRESHED", "acme")
    ]
    assert refreshes_counted("acme", "success") > counted
    # The built-in NinjaOne secrets were not touched.
    assert await world.secrets.get(key.tenant, "ninjaone_credentials") is None


async def test_generic_provider_with_host_patterns_and_its_token_path(
    world: World,
) -> None:
    beta = {
        "kind": "oauth2",
        "token_hosts": ["*.beta.test"],
        "token_path": "/ws/oauth/token",
        "allow_http_loopback": True,
        "credentials_secret": "beta_oauth",
    }
    await _client_secrets(world, "beta", CLIENT_SECRET)
    async with running(world.config(providers={"beta": beta})):
        key = await world.connect(provider="beta", secret_name="beta_oauth")
        await eventually(lambda: _refreshed(world, key))
    assert [r.path for r in world.endpoint.requests] == ["/ws/oauth/token"]
    assert world.endpoint.requests[0].client_auth == "post"
    assert world.endpoint.requests[0].scope is None


async def test_generic_provider_refuses_an_instance_url_outside_its_patterns(
    world: World,
) -> None:
    beta = {"kind": "oauth2", "token_hosts": ["*.beta.test"]}
    await _client_secrets(world, "beta", CLIENT_SECRET)
    async with running(world.config(providers={"beta": beta})):
        key = await world.connect(provider="beta", secret_name="beta_credentials")
        lifecycle = await _status(world, key, "unschedulable")
    failure = lifecycle["lastRefreshFailure"]
    assert failure["code"] == "token_url_refused"
    assert "*.beta.test" in failure["message"]
    assert world.endpoint.requests == []


async def test_rows_of_an_unconfigured_provider_are_reported_not_retried(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokend")
    counter = "tokend_unconfigured_provider_total"
    before = REGISTRY.get_sample_value(counter) or 0.0
    other = refreshes_counted("other", "unschedulable")
    due_now = {
        "tokenLifecycle": {
            "status": "scheduled",
            "scheduleNonce": 4,
            "nextRefreshAt": iso(time.time()),
        }
    }
    async with running(world.config()) as daemon:
        # Two by notification, one found due in the heap at the start of a
        # term, one whose provider name is absurdly long.
        keys = [
            await world.connect(provider="zoho"),
            await world.connect(provider="zoho"),
            await world.connect(provider="zoho", notify=False, settings=due_now),
            await world.connect(provider="z" * 2000),
        ]
        await world.conn.execute(
            "SELECT pg_notify('tokend', '{\"event\": \"resync\"}')"
        )
        found = [await _status(world, key, "unschedulable") for key in keys]
        nonces = [doc["scheduleNonce"] for doc in found]
        await anyio.sleep(2.5)
        for key in keys:
            assert key not in daemon.schedule
        assert [(await world.lifecycle(k) or {})["scheduleNonce"] for k in keys] == (
            nonces
        )

    for doc in found:
        failure = doc["lastRefreshFailure"]
        assert failure["code"] == "provider_not_configured"
        assert failure["retryable"] is False
        assert len(failure["message"]) <= MAX_MESSAGE
    assert "'zoho' is not configured" in found[0]["lastRefreshFailure"]["message"]
    assert world.endpoint.requests == []
    assert (REGISTRY.get_sample_value(counter) or 0.0) - before == 4
    assert refreshes_counted("other", "unschedulable") - other == 1
    assert (
        REGISTRY.get_sample_value(
            "tokend_refreshes_total", {"provider": "zoho", "outcome": "unschedulable"}
        )
        is None
    )
    logged = [r for r in caplog.records if "not configured" in r.getMessage()]
    assert [r.__dict__["provider"] for r in logged] == ["zoho", "z" * 64]
    for key in keys:
        events = await world.events(key)
        assert [e["type"] for e in events] == ["INTEGRATION_TOKEN_REFRESH_FAILED"]
        assert len(events[0]["error_message"]) <= MAX_MESSAGE


async def test_generic_provider_against_an_independent_oauth_server(
    world: World,
) -> None:
    """oidc-provider (npm), client_secret_post, rotation with reuse detection."""
    ensure_installed()
    if reason := node_available():
        pytest.skip(reason)
    async with oidc_server(CLIENT_ID, CLIENT_SECRET, access_ttl_s=60) as server:
        grant = await obtain_grant(server, CLIENT_ID, CLIENT_SECRET)
        expires_ms = int((time.time() + 31) * 1000)
        credentials = Credentials(
            grant["access_token"], grant["refresh_token"], expires_ms, None, {}
        )
        await _client_secrets(world, "oidc", CLIENT_SECRET)
        oidc = generic_provider(server.token_endpoint)
        config = world.config(
            providers={"oidc": oidc}, scheduler={"buffer_s": 30.0, "min_delay_s": 0.5}
        )
        async with running(config):
            key = await world.connect(
                provider="oidc",
                secret_name="oidc_credentials",
                credentials=credentials.dumps(),
            )
            lifecycle = await eventually(lambda: _refreshed(world, key))
        stored = await world.credentials(key, "oidc_credentials")
        assert stored.refresh_token != grant["refresh_token"]
        assert await token_active(
            server, CLIENT_ID, CLIENT_SECRET, stored.refresh_token
        )
        assert not await token_active(
            server, CLIENT_ID, CLIENT_SECRET, grant["refresh_token"]
        )
        assert stored.expires_at == pytest.approx(time.time() + 60, abs=15)
        assert lifecycle["status"] == "scheduled"
