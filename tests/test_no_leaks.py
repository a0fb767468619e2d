"""No token or secret reaches the logs, events, lifecycle or metrics, even
when a provider echoes them back in its errors."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from tests.helpers import CLIENT_ID, CLIENT_SECRET, World
from tests.refreshing import metrics_text, refresh_now, refresher, retry_now
from tokend.fake_endpoint import Fault
from tokend.lifecycle import MAX_MESSAGE
from tokend.logs import JsonFormatter

pytestmark = pytest.mark.anyio


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged, by any logger, as the daemon writes it: JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _echo(refresh_token: str) -> str:
    """What an over-helpful provider might say: our request, quoted."""
    form = f"grant_type=refresh_token&refresh_token={refresh_token}"
    return f"{form}&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


async def test_refreshes_leak_no_secret_anywhere(
    world: World, json_log: io.StringIO
) -> None:
    config = world.config(
        providers={"ninjaone": {"allow_http_loopback": True, "request_timeout_s": 0.5}},
        retry={"rotation_recheck_s": 0.1},
        database={"pool_size": 2},
    )
    healthy = await world.connect(notify=False)
    async with refresher(config) as r:
        assert await refresh_now(r, healthy) == "success"
        sent = (await world.credentials(healthy)).refresh_token
        echoing = [
            # The provider's error code is the token we sent, its text our form.
            Fault(
                status=400,
                body=orjson.dumps({"error": sent, "error_description": _echo(sent)}),
            ),
            Fault(
                status=500,
                body=_echo(sent).encode(),
                headers={"Content-Type": "text/html"},
            ),
            Fault(status=200, body=_echo(sent).encode()),
            # A token_type that is a token, and an unusable answer that
            # carries a new refresh token (kept, and logged as kept).
            Fault(action="grant", patch={"token_type": sent}),
            Fault(action="grant", patch={"expires_in": 0}),
            Fault(action="hang"),
            Fault(action="close_early"),
            Fault(action="grant"),
        ]
        world.endpoint.faults.extend(echoing)
        for _ in echoing:
            await retry_now(r, healthy)

        # Terminal answers that echo the refresh token in their description.
        for code in ("invalid_grant", "invalid_client"):
            key = await world.connect(notify=False)
            token = (await world.credentials(key)).refresh_token
            body = {"error": code, "error_description": f"bad token {token}"}
            world.endpoint.faults.append(Fault(status=400, body=orjson.dumps(body)))
            assert await refresh_now(r, key) in (
                "reconnect_required",
                "client_rejected",
            )

    secrets = [CLIENT_SECRET, *world.endpoint.issued()]
    assert len(secrets) > 10
    # The scan is not vacuous: the stored credentials hold issued tokens.
    stored = await world.credentials(healthy)
    assert _leaks(stored.access_token + stored.refresh_token, secrets)

    lines = json_log.getvalue().splitlines()
    messages = {orjson.loads(line)["message"] for line in lines}
    assert {"refresh succeeded", "refresh failed; will retry"} <= messages
    assert "reconnect required: the refresh token was rejected" in messages
    for line in lines:
        assert not _leaks(line, secrets), line

    for event in await world.events():
        assert not _leaks(orjson.dumps(event).decode(), secrets), event
        assert len(event["error_message"] or "") <= MAX_MESSAGE

    rows = await world.conn.fetch("SELECT settings::text AS s FROM rmm_integrations")
    assert len(rows) == 3
    for row in rows:
        assert not _leaks(row["s"], secrets), row["s"]
        failure = orjson.loads(row["s"])["tokenLifecycle"]["lastRefreshFailure"]
        assert failure is None or len(failure["message"]) <= MAX_MESSAGE

    assert not _leaks(metrics_text(), secrets)
    assert CLIENT_SECRET not in repr(config)
