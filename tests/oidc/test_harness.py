"""Self-test of the oidc-provider harness: real grants, real rotation."""

from __future__ import annotations

from functools import partial

import pytest

from .harness import (
    ensure_installed,
    node_available,
    obtain_grant,
    oidc_server,
    refresh_grant,
    refresh_works,
    revoke_token,
    token_active,
)

CLIENT_ID = "tokend-test"
CLIENT_SECRET = "s3cret-for-loopback-only"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _need_node() -> None:
    ensure_installed()
    if reason := node_available():
        pytest.skip(reason)


@pytest.mark.anyio
async def test_grants_and_rotation() -> None:
    async with oidc_server(CLIENT_ID, CLIENT_SECRET, access_ttl_s=60) as srv:
        assert srv.token_endpoint == srv.base_url + srv.token_path
        assert srv.base_url.startswith("http://127.0.0.1:")
        creds = (srv, CLIENT_ID, CLIENT_SECRET)
        refresh, active = partial(refresh_grant, *creds), partial(token_active, *creds)

        a = await obtain_grant(*creds)
        b = await obtain_grant(*creds)
        for g in (a, b):
            assert g["access_token"]
            assert g["refresh_token"]
            assert 55 <= g["expires_in"] <= 60
        assert a["refresh_token"] != b["refresh_token"]

        # Two rotations: each refresh returns a new refresh token.
        status, r1 = await refresh(a["refresh_token"])
        assert status == 200, r1
        status, r2 = await refresh(r1["refresh_token"])
        assert status == 200, r2
        assert len({a["refresh_token"], r1["refresh_token"], r2["refresh_token"]}) == 3
        assert await active(r2["refresh_token"])
        assert not await active(r1["refresh_token"])

        # Replaying a consumed refresh token is rejected...
        status, err = await refresh(a["refresh_token"])
        assert (status, err.get("error")) == (400, "invalid_grant"), err
        # ...and reuse detection revokes the whole grant, newest token included.
        assert not await active(r2["refresh_token"])

        # The other grant is independent and unaffected.
        assert await active(b["refresh_token"])
        assert await refresh_works(*creds, b["refresh_token"])
        assert not await refresh_works(*creds, b["refresh_token"])

        # A grant revoked at the provider is refused with invalid_grant too.
        c = await obtain_grant(*creds)
        await revoke_token(*creds, c["refresh_token"])
        status, err = await refresh(c["refresh_token"])
        assert (status, err.get("error")) == (400, "invalid_grant"), err

        # A wrong client secret is a client-auth failure, not a grant failure.
        status, err = await refresh_grant(srv, CLIENT_ID, "wrong", "whatever")
        assert (status, err.get("error")) == (401, "invalid_client"), err
