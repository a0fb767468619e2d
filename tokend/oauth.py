"""The token endpoint: one refresh_token grant, and what its answer means.

Every answer is classified into an Outcome; nothing a provider sends can
raise. Provider text is never copied into messages: a token endpoint may
echo what it was sent, so messages are built from the status and a
sanitized error code only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver

from tokend.logs import scrub

logger = logging.getLogger(__name__)

Kind = Literal["success", "transient", "reconnect_required", "client_rejected"]

TERMINAL_CODES = frozenset({"invalid_grant", "invalid_token"})
CLIENT_CODES = frozenset({"invalid_client", "unauthorized_client"})
# A longer expires_in is garbage, not a token to sleep on for years.
_MAX_LIFETIME_S = 366 * 86400
# Error codes are copied into lifecycle, events and logs, so only what looks
# like a code passes: every registered OAuth2 error is lowercase words joined
# by underscores. A provider that echoes a token in `error` gets this instead.
_CODE = re.compile(r"[a-z]+(_[a-z]+){0,7}")
_MAX_CODE = 40
UNRECOGNIZED = "unrecognized_error"


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str
    expires_at_ms: int
    token_type: str
    expires_in_defaulted: bool = False

    def __repr__(self) -> str:
        return f"TokenSet(expires_at_ms={self.expires_at_ms}, <tokens hidden>)"


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    code: str
    message: str
    http_status: int | None = None
    retry_after_s: float | None = None
    tokens: TokenSet | None = None
    # A refresh token found in an otherwise unusable 200 answer: the provider
    # may already have retired the one we sent, so it must be kept.
    salvaged_refresh_token: str | None = field(default=None, repr=False)

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"


@dataclass(frozen=True)
class Grant:
    """What to send: the URL, the refresh token and the client."""

    url: str
    refresh_token: str
    client_id: str
    client_secret: str
    client_auth: str = "client_secret_post"
    scope: str = ""

    def __repr__(self) -> str:
        return f"Grant(url={self.url!r}, <secrets hidden>)"


def session(resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The HTTP client of all refreshes: certificates verified with the
    system's trust store, never otherwise; `resolver` replaces DNS (tests)."""
    connector = aiohttp.TCPConnector(
        limit=0, ttl_dns_cache=300, ssl=ssl.create_default_context(), resolver=resolver
    )
    # Each request has its own timeout; this one only bounds a forgotten one.
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    )


async def request_refresh(
    session: aiohttp.ClientSession,
    grant: Grant,
    *,
    timeout_s: float,
    max_body_bytes: int,
    default_expires_in_s: float,
) -> Outcome:
    """POST the grant and classify the answer; never raises for provider faults.

    TLS is verified by the session's defaults; nothing here may turn it off.
    Redirects are not followed: the form carries the client secret.
    """
    form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token}
    headers = {"Accept": "application/json"}
    if grant.client_auth == "client_secret_basic":
        # RFC 6749 2.3.1: both are form-urlencoded before going into the header.
        login = quote(grant.client_id, safe="")
        password = quote(grant.client_secret, safe="")
        pair = f"{login}:{password}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form["client_id"] = grant.client_id
        form["client_secret"] = grant.client_secret
    if grant.scope:
        form["scope"] = grant.scope
    # Encoded here, as aiohttp would (quote_plus), without its form machinery:
    # a measurable share of the client's CPU per refresh.
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    encoded = urlencode(form).encode()
    try:
        async with session.post(
            grant.url,
            data=encoded,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            body = await _read_bounded(response.content, max_body_bytes + 1)
            return classify(
                response.status,
                response.headers.get("Retry-After"),
                body,
                max_body_bytes=max_body_bytes,
                default_expires_in_s=default_expires_in_s,
                sent=(grant.refresh_token, grant.client_secret, grant.client_id),
            )
    except TimeoutError:
        return Outcome("transient", "timeout", f"no answer within {timeout_s:g} s")
    except aiohttp.ClientConnectorDNSError as exc:
        return Outcome("transient", "dns_failed", _network_message(exc))
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
        return Outcome("transient", "tls_failed", _network_message(exc))
    except aiohttp.ClientConnectorError as exc:
        return Outcome("transient", "connect_failed", _network_message(exc))
    except (aiohttp.ClientError, asyncio.IncompleteReadError, OSError) as exc:
        return Outcome("transient", "network_error", _network_message(exc))


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Read until EOF or `limit` bytes, whichever comes first: read(n) alone
    returns whatever chunk has arrived, which may be a fraction of the body."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _network_message(exc: BaseException) -> str:
    # aiohttp's text names the host and the OS error, never the form body;
    # scrub anyway, as the message is stored.
    return scrub(f"{type(exc).__name__}: {exc}")[:200]


def classify(
    status: int,
    retry_after: str | None,
    body: bytes,
    *,
    max_body_bytes: int,
    default_expires_in_s: float,
    now: float | None = None,
    sent: tuple[str, ...] = (),
) -> Outcome:
    """What an answer means; `sent` are the secret values of the request,
    which never pass into the outcome even when the provider echoes them."""
    now = time.time() if now is None else now
    if len(body) > max_body_bytes:
        return Outcome(
            "transient", "body_too_large", f"answer over {max_body_bytes} bytes", status
        )
    doc = _json_object(body)
    if status == 200:
        return _success(doc, now, default_expires_in_s)
    code = _error_code(doc, sent)
    message = f"token endpoint answered {status}" + (f" {code}" if code else "")
    if code in TERMINAL_CODES and status in (400, 401):
        return Outcome("reconnect_required", code, message, status)
    if code in CLIENT_CODES and status in (400, 401):
        return Outcome(
            "client_rejected",
            code,
            message + ": the client id or secret was rejected; "
            "an operator must fix the provider's client credentials",
            status,
        )
    retry_after_s = (
        parse_retry_after(retry_after, now) if status in (429, 503) else None
    )
    return Outcome(
        "transient", code or f"http_{status}", message, status, retry_after_s
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _error_code(doc: dict[str, Any] | None, sent: tuple[str, ...]) -> str:
    code = doc.get("error") if doc else None
    if code is None:
        return ""
    if (
        not isinstance(code, str)
        or len(code) > _MAX_CODE
        or not _CODE.fullmatch(code)
        or any(value and value in code for value in sent)
    ):
        return UNRECOGNIZED
    return code


def _success(doc: dict[str, Any] | None, now: float, default_s: float) -> Outcome:
    refresh = doc.get("refresh_token") if doc else None
    salvaged = refresh if isinstance(refresh, str) and refresh else None

    def bad(code: str, message: str) -> Outcome:
        return Outcome("transient", code, message, 200, salvaged_refresh_token=salvaged)

    if doc is None:
        return bad("invalid_response", "200 answer is not a JSON object")
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        return bad("invalid_response", "200 answer has no access_token")
    if refresh not in (None, "") and salvaged is None:
        # Present but not a string: the provider may have rotated to a token
        # we cannot read, so this is no success that keeps the old one.
        return bad("invalid_response", "200 answer has a malformed refresh_token")
    expires_in = doc.get("expires_in")
    defaulted = expires_in is None
    if defaulted:
        lifetime = default_s
    else:
        parsed = _number(expires_in)
        if parsed is None or not 0 < parsed <= _MAX_LIFETIME_S:
            return bad("invalid_expires_in", "200 answer has an unusable expires_in")
        lifetime = parsed
    token_type = doc.get("token_type")
    tokens = TokenSet(
        access_token=access,
        refresh_token=salvaged or "",
        expires_at_ms=int((now + lifetime) * 1000),
        token_type=token_type if isinstance(token_type, str) else "",
        expires_in_defaulted=defaulted,
    )
    return Outcome("success", "ok", "refreshed", 200, tokens=tokens)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date; None when unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - now)
