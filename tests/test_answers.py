"""Every answer a token endpoint can give, one row each: what tokend makes of
it in the lifecycle, the stored credentials, the events and the metrics.

Each row seeds one integration, scripts the fake endpoint, runs one refresh
through a real Refresher (real Postgres, real HTTP on loopback) and checks
everything it wrote. docs/providers.md has the same table for readers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import CLIENT_ID, CLIENT_SECRET, World
from tests.refreshing import (
    FailingResolver,
    closed_port,
    generic_provider,
    refresh_now,
    refresher,
    refreshes_counted,
)
from tokend.credentials import Credentials
from tokend.fake_endpoint import FakeTokenEndpoint, Fault
from tokend.lifecycle import parse_iso

pytestmark = pytest.mark.anyio

DEFAULT_LIFETIME_S = 1234.0
RETRY_AFTER_CAP_S = 30.0
INITIAL_BACKOFF_S = 0.5

SCHEDULED = ("INTEGRATION_TOKEN_REFRESHED",)
FAILED = ("INTEGRATION_TOKEN_REFRESH_FAILED",)
RECONNECT = ("INTEGRATION_RECONNECT_REQUIRED",)


@dataclass(frozen=True)
class Case:
    """One row: the answer (faults, setup) and what must follow from it."""

    faults: Callable[[], list[Fault]]
    status: str
    outcome: str
    events: tuple[str, ...]
    # What the credentials secret holds afterwards: rotated (the new set),
    # kept (new access token, the refresh token sent), salvaged (only the
    # refresh token of an unusable answer), unchanged.
    stored: str
    code: str | None = None
    http_status: int | None = None
    setup: str = ""
    lifetime_s: float | None = None
    # The retry's delay must be at least this (Retry-After honoured)...
    min_delay_s: float | None = None
    # ...and at most this (backoff or cap).
    max_delay_s: float | None = None
    log: str | None = None
    token_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def answer(status: int, body: bytes | dict[str, Any] = b"", **headers: str) -> Fault:
    raw = orjson.dumps(body) if isinstance(body, dict) else body
    return Fault(status=status, body=raw, headers=headers)


def grant(**patch: Any) -> Fault:
    return Fault(action="grant", patch=patch)


def retrying(code: str, http_status: int | None, **more: Any) -> dict[str, Any]:
    more.setdefault("max_delay_s", INITIAL_BACKOFF_S)
    return dict(
        status="retrying",
        outcome="transient",
        events=FAILED,
        code=code,
        http_status=http_status,
        **more,
    )


def refreshed(stored: str, **more: Any) -> dict[str, Any]:
    return dict(
        status="scheduled", outcome="success", events=SCHEDULED, stored=stored, **more
    )


def http_date(seconds_from_now: float) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)
    return format_datetime(moment, usegmt=True)


HTML = b"<!DOCTYPE html><html><body><h1>Maintenance</h1></body></html>"

CASES: dict[str, Case] = {
    # -- 200 and expires_in ------------------------------------------------
    "200 expires_in number": Case(
        lambda: [grant()], **refreshed("rotated", lifetime_s=3600)
    ),
    "200 expires_in numeric string": Case(
        lambda: [grant(expires_in="3600")], **refreshed("rotated", lifetime_s=3600)
    ),
    "200 expires_in missing": Case(
        lambda: [Fault(action="grant", drop=("expires_in",))],
        **refreshed(
            "rotated",
            lifetime_s=DEFAULT_LIFETIME_S,
            log="token endpoint sent no expires_in",
        ),
    ),
    "200 expires_in zero": Case(
        lambda: [grant(expires_in=0)],
        stored="salvaged",
        **retrying("invalid_expires_in", 200),
    ),
    "200 expires_in negative": Case(
        lambda: [grant(expires_in=-60)],
        stored="salvaged",
        **retrying("invalid_expires_in", 200),
    ),
    "200 expires_in not a number": Case(
        lambda: [grant(expires_in="soon")],
        stored="salvaged",
        **retrying("invalid_expires_in", 200),
    ),
    # -- 200 and the refresh token -------------------------------------------
    "200 without refresh_token": Case(
        lambda: [grant()], setup="not rotating", **refreshed("kept")
    ),
    "200 refresh_token empty": Case(
        lambda: [grant(refresh_token="")], setup="not rotating", **refreshed("kept")
    ),
    "200 refresh_token null": Case(
        lambda: [grant(refresh_token=None)], setup="not rotating", **refreshed("kept")
    ),
    "200 refresh_token not a string": Case(
        lambda: [grant(refresh_token=["rt_x"])],
        stored="unchanged",
        **retrying("invalid_response", 200),
    ),
    "200 new refresh_token": Case(lambda: [grant()], **refreshed("rotated")),
    "200 token_type not bearer": Case(
        lambda: [grant(token_type="N_A")],
        **refreshed("rotated", token_type="N_A", log="other than bearer"),
    ),
    "200 in slow chunks": Case(
        lambda: [Fault(action="grant", chunk_delay_s=0.3)], **refreshed("rotated")
    ),
    # -- 200 that is not a token answer --------------------------------------
    "200 invalid JSON": Case(
        lambda: [answer(200, b'{"access_token": "at_x", "expires_in": 36')],
        stored="unchanged",
        **retrying("invalid_response", 200),
    ),
    "200 HTML page": Case(
        lambda: [answer(200, HTML, **{"Content-Type": "text/html"})],
        stored="unchanged",
        **retrying("invalid_response", 200),
    ),
    "200 empty body": Case(
        lambda: [answer(200)], stored="unchanged", **retrying("invalid_response", 200)
    ),
    "200 huge body": Case(
        lambda: [answer(200, b'{"access_token": "' + b"a" * 300_000 + b'"}')],
        stored="unchanged",
        **retrying("body_too_large", 200),
    ),
    "200 endless body": Case(
        lambda: [Fault(action="endless")],
        stored="unchanged",
        **retrying("body_too_large", 200),
    ),
    "200 missing access_token": Case(
        lambda: [Fault(action="grant", drop=("access_token",))],
        stored="salvaged",
        **retrying("invalid_response", 200),
    ),
    # -- the provider says no ---------------------------------------------------
    "400 invalid_grant": Case(
        lambda: [answer(400, {"error": "invalid_grant"})],
        status="reconnect_required",
        outcome="reconnect_required",
        events=RECONNECT,
        stored="unchanged",
        code="invalid_grant",
        http_status=400,
    ),
    "400 invalid_token": Case(
        lambda: [answer(400, {"error": "invalid_token"})],
        status="reconnect_required",
        outcome="reconnect_required",
        events=RECONNECT,
        stored="unchanged",
        code="invalid_token",
        http_status=400,
    ),
    "401 invalid_client": Case(
        lambda: [answer(401, {"error": "invalid_client"})],
        status="unschedulable",
        outcome="client_rejected",
        events=FAILED,
        stored="unchanged",
        code="invalid_client",
        http_status=401,
    ),
    "400 unauthorized_client": Case(
        lambda: [answer(400, {"error": "unauthorized_client"})],
        status="unschedulable",
        outcome="client_rejected",
        events=FAILED,
        stored="unchanged",
        code="unauthorized_client",
        http_status=400,
    ),
    "400 unknown error code": Case(
        lambda: [answer(400, {"error": "mystery_condition"})],
        stored="unchanged",
        **retrying("mystery_condition", 400),
    ),
    "400 no body": Case(
        lambda: [answer(400)], stored="unchanged", **retrying("http_400", 400)
    ),
    # -- slow down ------------------------------------------------------------
    "429 without Retry-After": Case(
        lambda: [answer(429)], stored="unchanged", **retrying("http_429", 429)
    ),
    "429 Retry-After seconds": Case(
        lambda: [answer(429, **{"Retry-After": "7"})],
        stored="unchanged",
        **retrying("http_429", 429, min_delay_s=7.0, max_delay_s=7.5),
    ),
    "429 Retry-After HTTP-date": Case(
        lambda: [answer(429, **{"Retry-After": http_date(20)})],
        stored="unchanged",
        **retrying("http_429", 429, min_delay_s=18.0, max_delay_s=20.5),
    ),
    "429 Retry-After over the cap": Case(
        lambda: [answer(429, **{"Retry-After": "86400"})],
        stored="unchanged",
        **retrying(
            "http_429",
            429,
            min_delay_s=RETRY_AFTER_CAP_S,
            max_delay_s=RETRY_AFTER_CAP_S + 0.5,
        ),
    ),
    "500": Case(lambda: [answer(500)], stored="unchanged", **retrying("http_500", 500)),
    "502": Case(
        lambda: [answer(502, HTML)], stored="unchanged", **retrying("http_502", 502)
    ),
    "503": Case(
        lambda: [answer(503, {"error": "temporarily_unavailable"})],
        stored="unchanged",
        **retrying("temporarily_unavailable", 503),
    ),
    "504": Case(lambda: [answer(504)], stored="unchanged", **retrying("http_504", 504)),
    "307 redirect is not followed": Case(
        lambda: [],
        setup="redirect",
        stored="unchanged",
        **retrying("http_307", 307),
    ),
    # -- no answer at all --------------------------------------------------------
    "connection refused": Case(
        lambda: [],
        setup="refused",
        stored="unchanged",
        **retrying("connect_failed", None),
    ),
    "reset before the answer": Case(
        lambda: [Fault(action="reset")],
        stored="unchanged",
        **retrying("network_error", None),
    ),
    "reset mid-answer": Case(
        lambda: [Fault(action="close_early")],
        stored="unchanged",
        **retrying("network_error", None),
    ),
    "never answers": Case(
        lambda: [Fault(action="hang")],
        stored="unchanged",
        **retrying("timeout", None),
    ),
    "DNS failure": Case(
        lambda: [],
        setup="dns",
        stored="unchanged",
        **retrying("dns_failed", None),
    ),
    "TLS certificate not trusted": Case(
        lambda: [],
        setup="tls",
        stored="unchanged",
        **retrying("tls_failed", None),
    ),
}


@dataclass
class Setup:
    """Where one row's integration points and how tokend is configured."""

    providers: dict[str, Any]
    provider: str = "ninjaone"
    instance_url: str | None = None
    resolver: FailingResolver | None = None
    bystander: FakeTokenEndpoint | None = None

    @property
    def secret_name(self) -> str:
        return f"{self.provider}_credentials"


def _ninjaone(**more: Any) -> dict[str, Any]:
    return {
        "allow_http_loopback": True,
        "request_timeout_s": 1.0,
        "default_expires_in_s": DEFAULT_LIFETIME_S,
        **more,
    }


def _acme(url: str) -> dict[str, Any]:
    return generic_provider(
        url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, request_timeout_s=1.0
    )


async def _prepare(
    case: Case, world: World, stack: AsyncExitStack, tmp_path: Path
) -> Setup:
    setup = Setup({"ninjaone": _ninjaone()})
    if case.setup == "not rotating":
        world.endpoint.rotate_refresh_tokens = False
    elif case.setup == "refused":
        setup.instance_url = f"http://127.0.0.1:{closed_port()}"
    elif case.setup == "redirect":
        setup.bystander = await _started(stack, FakeTokenEndpoint({}))
        target = setup.bystander.url + "/oauth/token"
        world.endpoint.faults.append(answer(307, Location=target))
    elif case.setup == "dns":
        # A reserved name that resolves nowhere, asked of a resolver that
        # answers nothing: no DNS server is ever queried.
        setup.resolver = FailingResolver()
        setup.provider = "acme"
        setup.providers["acme"] = _acme("https://token.tokend-test.invalid/token")
    elif case.setup == "tls":
        context = _self_signed_context(tmp_path)
        tls = await _started(
            stack, FakeTokenEndpoint({CLIENT_ID: CLIENT_SECRET}), context
        )
        setup.provider = "acme"
        setup.providers["acme"] = _acme(tls.url + "/oauth/token")
        setup.bystander = tls
    world.endpoint.faults.extend(case.faults())
    return setup


async def _started(
    stack: AsyncExitStack,
    endpoint: FakeTokenEndpoint,
    context: ssl.SSLContext | None = None,
) -> FakeTokenEndpoint:
    await endpoint.start(ssl_context=context)
    stack.push_async_callback(endpoint.stop)
    return endpoint


def _self_signed_context(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.mark.parametrize("name", list(CASES))
async def test_answer(
    name: str,
    world: World,
    stack: AsyncExitStack,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = CASES[name]
    caplog.set_level(logging.INFO, logger="tokend")
    setup = await _prepare(case, world, stack, tmp_path)
    config = world.config(
        providers=setup.providers,
        retry={
            "initial_s": INITIAL_BACKOFF_S,
            "max_s": 2.0,
            "retry_after_cap_s": RETRY_AFTER_CAP_S,
            "rotation_recheck_s": 0.2,
        },
        database={"pool_size": 2},
    )
    key = await world.connect(
        notify=False,
        instance_url=setup.instance_url,
        provider=setup.provider,
        secret_name=setup.secret_name,
    )
    sent = await world.credentials(key, setup.secret_name)
    counted = refreshes_counted(setup.provider, case.outcome)

    started = time.time()
    async with refresher(config, resolver=setup.resolver) as r:
        assert await refresh_now(r, key) == case.outcome
    assert refreshes_counted(setup.provider, case.outcome) == counted + 1

    lifecycle = await world.lifecycle(key)
    assert lifecycle is not None
    _check_lifecycle(case, lifecycle)
    events = await world.events(key)
    assert tuple(e["type"] for e in events) == case.events
    for event in events:
        assert event["error_code"] == case.code
        assert event["provider"] == setup.provider
    stored = await world.credentials(key, setup.secret_name)
    _check_stored(case, world.endpoint, sent, stored, started)
    if case.log:
        assert any(case.log in r.getMessage() for r in caplog.records), case.log
    if setup.resolver is not None:
        assert setup.resolver.asked == ["token.tokend-test.invalid"]
    if case.setup == "redirect":
        assert setup.bystander is not None and setup.bystander.requests == []
    if case.setup == "tls":
        assert setup.bystander is not None and setup.bystander.requests == []


def _check_lifecycle(case: Case, lifecycle: dict[str, Any]) -> None:
    assert lifecycle["status"] == case.status
    failure = lifecycle["lastRefreshFailure"]
    if case.code is None:
        assert failure is None
        assert lifecycle["consecutiveFailures"] == 0
        assert lifecycle["lastRefreshAt"] is not None
        return
    assert failure["code"] == case.code
    assert failure["httpStatus"] == case.http_status
    assert failure["retryable"] is (case.status == "retrying")
    assert 0 < len(failure["message"]) <= 500
    assert lifecycle["consecutiveFailures"] == 1
    assert lifecycle["reconnectRequired"] is (case.status == "reconnect_required")
    if case.status == "reconnect_required":
        assert case.code in lifecycle["reconnectReason"]
    if case.status == "unschedulable":
        assert "client id or secret was rejected" in failure["message"]
    if case.status != "retrying":
        assert lifecycle["nextRefreshAt"] is None
        return
    failed_at = parse_iso(failure["failedAt"], "failedAt")
    next_at = parse_iso(lifecycle["nextRefreshAt"], "nextRefreshAt")
    assert failed_at is not None and next_at is not None
    assert case.max_delay_s is not None
    # Both are stored to the millisecond.
    delay = next_at - failed_at
    assert (case.min_delay_s or 0.0) - 0.002 <= delay <= case.max_delay_s + 0.002


def _check_stored(
    case: Case,
    endpoint: FakeTokenEndpoint,
    sent: Credentials,
    stored: Credentials,
    started: float,
) -> None:
    issued = [e.new_refresh_token for e in endpoint.log if e.result == "ok"]
    if case.stored == "unchanged":
        assert stored == sent
        return
    if case.stored == "salvaged":
        assert issued and stored.refresh_token == issued[-1] != sent.refresh_token
        assert stored.access_token == sent.access_token
        assert stored.expires_at_ms == sent.expires_at_ms
        assert endpoint.refresh_token_valid(stored.refresh_token)
        return
    assert stored.access_token != sent.access_token
    assert endpoint.access_token_valid(stored.access_token)
    assert endpoint.refresh_token_valid(stored.refresh_token)
    if case.stored == "kept":
        assert stored.refresh_token == sent.refresh_token
    else:
        assert issued and stored.refresh_token == issued[-1] != sent.refresh_token
    if case.lifetime_s is not None:
        assert stored.expires_at == pytest.approx(started + case.lifetime_s, abs=5)
    assert stored.extra.get("token_type") == case.token_type
