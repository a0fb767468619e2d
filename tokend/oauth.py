"""The token endpoint: one refresh_token grant, and what its answer means.

Every answer is classified into an Outcome; nothing a provider sends can
raise. Provider text is never copied into messages: a token endpoint may
echo what it was sent, so messages are built from the status and a
sanitized error code only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import orjson

logger = logging.getLogger(__name__)

Kind = Literal["success", "transient", "reconnect_required", "client_rejected"]

TERMINAL_CODES = frozenset({"invalid_grant", "invalid_token"})
CLIENT_CODES = frozenset({"invalid_client", "unauthorized_client"})
# A longer expires_in is garbage, not a token to sleep on for years.
_MAX_LIFETIME_S = 366 * 86400
_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


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


async def request_refresh(
    session: aiohttp.ClientSession,
    grant: Grant,
    *,
    timeout_s: float,
    max_body_bytes: int,
    default_expires_in_s: float,
) -> Outcome:
    """POST the grant and classify the answer; never raises for provider faults."""
    form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token}
    auth = None
    if grant.client_auth == "client_secret_basic":
        auth = aiohttp.BasicAuth(grant.client_id, grant.client_secret)
    else:
        form["client_id"] = grant.client_id
        form["client_secret"] = grant.client_secret
    if grant.scope:
        form["scope"] = grant.scope
    try:
        async with session.post(
            grant.url,
            data=form,
            auth=auth,
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            body = await response.content.read(max_body_bytes + 1)
            return classify(
                response.status,
                response.headers.get("Retry-After"),
                body,
                max_body_bytes=max_body_bytes,
                default_expires_in_s=default_expires_in_s,
            )
    except TimeoutError:
        return Outcome("transient", "timeout", f"no answer within {timeout_s:g} s")
    except aiohttp.ClientConnectorError as exc:
        return Outcome("transient", "connect_failed", _network_message(exc))
    except (aiohttp.ClientError, asyncio.IncompleteReadError, OSError) as exc:
        return Outcome("transient", "network_error", _network_message(exc))


def _network_message(exc: BaseException) -> str:
    # The exception text of aiohttp names the host, never the form body.
    return f"{type(exc).__name__}: {exc}"[:200]


def classify(
    status: int,
    retry_after: str | None,
    body: bytes,
    *,
    max_body_bytes: int,
    default_expires_in_s: float,
    now: float | None = None,
) -> Outcome:
    now = time.time() if now is None else now
    if len(body) > max_body_bytes:
        return Outcome(
            "transient", "body_too_large", f"answer over {max_body_bytes} bytes", status
        )
    doc = _json_object(body)
    if status == 200:
        return _success(doc, now, default_expires_in_s)
    code = _error_code(doc)
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


def _error_code(doc: dict[str, Any] | None) -> str:
    code = doc.get("error") if doc else None
    if isinstance(code, str) and _CODE.fullmatch(code):
        return code
    return ""


def _success(doc: dict[str, Any] | None, now: float, default_s: float) -> Outcome:
    def bad(code: str, message: str) -> Outcome:
        return Outcome("transient", code, message, 200)

    if doc is None:
        return bad("invalid_response", "200 answer is not a JSON object")
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        return bad("invalid_response", "200 answer has no access_token")
    expires_in = doc.get("expires_in")
    defaulted = expires_in is None
    if defaulted:
        lifetime = default_s
    else:
        parsed = _number(expires_in)
        if parsed is None or not 0 < parsed <= _MAX_LIFETIME_S:
            return bad("invalid_expires_in", "200 answer has an unusable expires_in")
        lifetime = parsed
    refresh = doc.get("refresh_token")
    token_type = doc.get("token_type")
    tokens = TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) else "",
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
