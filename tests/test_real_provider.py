"""The main job against a token endpoint no one here wrote: oidc-provider
(npm), with refresh-token rotation on and one-minute access tokens.

Real grants are obtained without a browser, tokend refreshes each
integration at least twice, and every stored refresh token is then proven
to work at that server.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import orjson
import pytest

from tests.helpers import World, eventually, running
from tests.oidc import harness
from tokend.credentials import Credentials
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio

CLIENT_ID = "tokend-real-input"
CLIENT_SECRET = "real-input-" + uuid.uuid4().hex
INTEGRATIONS = 3


@pytest.fixture(scope="module", autouse=True)
def _node() -> None:
    reason = harness.node_available()
    if reason:
        pytest.skip(f"real-input test needs Node.js: {reason}")
    harness.ensure_installed()


async def test_refreshes_against_oidc_provider_keep_every_grant_alive(
    world: World,
) -> None:
    async with harness.oidc_server(CLIENT_ID, CLIENT_SECRET, access_ttl_s=60) as server:
        config = world.config(
            scheduler={"buffer_s": 57.0, "min_delay_s": 1.0, "spread_s": 1.0},
            providers={
                "ninjaone": {
                    "allow_http_loopback": True,
                    "token_path": server.token_path,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                }
            },
        )
        # The provider config, not the test endpoint's app secrets, names
        # the client here.
        await world.conn.execute("DELETE FROM tokend_secrets")
        keys = []
        for _ in range(INTEGRATIONS):
            grant = await harness.obtain_grant(server, CLIENT_ID, CLIENT_SECRET)
            expires_ms = int((time.time() + grant["expires_in"]) * 1000)
            credentials = Credentials(
                grant["access_token"],
                grant["refresh_token"],
                expires_ms,
                server.base_url,
                {},
            )
            keys.append(
                await world.connect(
                    credentials=credentials.dumps(), instance_url=server.base_url
                )
            )

        async with running(config):

            async def refreshed_twice() -> bool:
                counts = Counter(
                    e["integration_id"]
                    for e in await world.events()
                    if e["type"] == "INTEGRATION_TOKEN_REFRESHED"
                )
                return all(counts[str(k.integration_id)] >= 2 for k in keys)

            await eventually(refreshed_twice, timeout_s=60, every_s=0.5)

        failures = [e for e in await world.events() if e["error_code"]]
        assert failures == []
        for key in keys:
            await _assert_stored_token_works(world, server, key)


async def _assert_stored_token_works(
    world: World, server: harness.OidcServer, key: IntegrationKey
) -> None:
    lifecycle = await world.lifecycle(key)
    assert lifecycle is not None and lifecycle["status"] == "scheduled"
    stored = await world.credentials(key)
    assert await harness.token_active(
        server, CLIENT_ID, CLIENT_SECRET, stored.access_token
    )
    status, answer = await harness.refresh_grant(
        server, CLIENT_ID, CLIENT_SECRET, stored.refresh_token
    )
    assert status == 200, orjson.dumps(answer)
    assert answer["refresh_token"] != stored.refresh_token
