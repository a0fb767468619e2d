"""The grant goes out form-encoded, exactly, whatever characters it holds
(the form is encoded by tokend, not by aiohttp's form machinery)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from tokend import oauth

pytestmark = pytest.mark.anyio

AWKWARD = "s3&c+r=t é/%20?#\u2603"


async def test_the_grant_form_arrives_as_sent() -> None:
    seen: dict[str, Any] = {}

    async def token(request: web.Request) -> web.Response:
        seen["type"] = request.headers.get("Content-Type")
        seen["accept"] = request.headers.get("Accept")
        seen["form"] = dict(await request.post())
        return web.json_response({"access_token": "a", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with oauth.session() as http:
            grant = oauth.Grant(
                url=f"http://127.0.0.1:{port}/token",
                refresh_token="rt " + AWKWARD,
                client_id="id " + AWKWARD,
                client_secret=AWKWARD,
                scope="read write",
            )
            outcome = await oauth.request_refresh(
                http,
                grant,
                timeout_s=5,
                max_body_bytes=4096,
                default_expires_in_s=60,
            )
    finally:
        await runner.cleanup()
    assert outcome.kind == "success"
    assert seen["type"] == "application/x-www-form-urlencoded"
    assert seen["accept"] == "application/json"
    assert seen["form"] == {
        "grant_type": "refresh_token",
        "refresh_token": "rt " + AWKWARD,
        "client_id": "id " + AWKWARD,
        "client_secret": AWKWARD,
        "scope": "read write",
    }
