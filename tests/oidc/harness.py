"""Drive a real, independently written OAuth 2.0 server (npm ``oidc-provider``).

``server.mjs`` runs it on 127.0.0.1 with one ``client_secret_post`` client and
refresh-token rotation on. This module starts it, logs in through its HTML
forms with aiohttp (no browser) and talks to its token endpoint.

Rotation semantics that tests must respect: every successful refresh consumes
the refresh token used, and presenting a consumed one fails with
``invalid_grant`` *and revokes the whole grant*, including the newest refresh
token. Use :func:`token_active` (introspection) to check a refresh token
without consuming it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp

HERE = Path(__file__).resolve().parent
SERVER_JS = HERE / "server.mjs"
NODE_MODULES = HERE / "node_modules"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)

__all__ = [
    "OidcServer",
    "ensure_installed",
    "node_available",
    "obtain_grant",
    "oidc_server",
    "refresh_grant",
    "refresh_works",
    "revoke_token",
    "token_active",
]


@dataclass(frozen=True)
class OidcServer:
    issuer: str  # e.g. http://127.0.0.1:PORT
    base_url: str  # scheme://host:port
    token_endpoint: str  # full URL
    token_path: str  # e.g. /token
    authorization_endpoint: str
    introspection_endpoint: str
    revocation_endpoint: str
    redirect_uri: str
    port: int


def node_available() -> str | None:
    """Return why the server cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "Node.js (node) is not on PATH"
    if not (NODE_MODULES / "oidc-provider" / "package.json").is_file():
        return f"oidc-provider is not installed; run `npm ci` in {HERE}"
    return None


def ensure_installed(timeout_s: float = 300.0) -> None:
    """Run ``npm ci`` in tests/oidc when node_modules is missing.

    Does nothing when it is present or when npm is absent (node_available()
    then gives the skip reason). Raises RuntimeError if npm ci fails.
    """
    if (NODE_MODULES / "oidc-provider" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        return
    try:
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"npm ci in {HERE} took over {timeout_s}s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"npm ci in {HERE} failed:\n{proc.stderr[-2000:]}")


@contextlib.asynccontextmanager
async def oidc_server(
    client_id: str,
    client_secret: str,
    access_ttl_s: int = 60,
    *,
    start_timeout_s: float = 20.0,
) -> AsyncIterator[OidcServer]:
    """Run server.mjs on a free loopback port for the duration of the block."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("Node.js (node) is not on PATH")
    # A file, not a pipe: nobody drains stderr, and a full pipe would block node.
    with tempfile.TemporaryFile() as errlog:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(SERVER_JS),
            "--port=0",
            f"--access-ttl={int(access_ttl_s)}",
            "--watch-stdin",
            cwd=HERE,
            # Secrets via env, not argv, so they do not show up in `ps`.
            env={
                **os.environ,
                "OIDC_CLIENT_ID": client_id,
                "OIDC_CLIENT_SECRET": client_secret,
            },
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errlog,
        )
        try:
            info = await _read_ready_line(proc, start_timeout_s, errlog)
            yield _server_from(info)
        finally:
            await _stop(proc)


async def _read_ready_line(
    proc: asyncio.subprocess.Process, timeout_s: float, errlog: IO[bytes]
) -> dict[str, Any]:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            while line := await proc.stdout.readline():
                if line.startswith(b"{"):
                    info: dict[str, Any] = json.loads(line)
                    return info
    except TimeoutError:
        pass
    errlog.seek(0)
    tail = errlog.read()[-2000:].decode(errors="replace")
    raise RuntimeError(f"oidc server did not start (rc={proc.returncode}):\n{tail}")


def _server_from(info: dict[str, Any]) -> OidcServer:
    token = urlsplit(info["token_endpoint"])
    return OidcServer(
        issuer=info["issuer"],
        base_url=f"{token.scheme}://{token.netloc}",
        token_endpoint=info["token_endpoint"],
        token_path=token.path,
        authorization_endpoint=info["authorization_endpoint"],
        introspection_endpoint=info["introspection_endpoint"],
        revocation_endpoint=info["revocation_endpoint"],
        redirect_uri=info["redirect_uri"],
        port=int(info["port"]),
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()


class _FormParser(HTMLParser):
    """Collects the first <form>'s action and its named <input> values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = a.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def obtain_grant(
    server: OidcServer, client_id: str, client_secret: str, *, username: str = "alice"
) -> dict[str, Any]:
    """Log in and consent through the provider's HTML forms, exchange the code.

    Each call uses a fresh cookie jar, hence a new login session and a new,
    independent grant. Returns the token response (access_token,
    refresh_token, expires_in, id_token, scope, token_type).
    """
    verifier, challenge = _pkce_pair()
    state = secrets.token_urlsafe(16)
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": server.redirect_uri,
        # prompt=consent is required for oidc-provider to keep offline_access.
        "scope": "openid offline_access",
        "prompt": "consent",
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    # unsafe=True: aiohttp otherwise drops cookies set by IP-address hosts.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=HTTP_TIMEOUT) as http:
        resp = await http.get(
            server.authorization_endpoint, params=params, allow_redirects=False
        )
        # login page, then consent page; a few spare steps for safety.
        for _ in range(10):
            async with resp:
                body = await resp.text()
                location = resp.headers.get("Location")
                url = str(resp.url)
            if location is not None:
                target = urljoin(url, location)
                if target.startswith(server.redirect_uri):
                    return await _exchange_code(
                        http, server, client_id, client_secret, target, state, verifier
                    )
                resp = await http.get(target, allow_redirects=False)
                continue
            if resp.status != 200:
                raise RuntimeError(f"authorization got {resp.status}: {body[:500]}")
            form = _FormParser()
            form.feed(body)
            if form.action is None:
                raise RuntimeError(f"no form on interaction page: {body[:500]}")
            data = dict(form.fields)
            if data.get("prompt") == "login":
                data.update(login=username, password="any")
            resp = await http.post(
                urljoin(url, form.action), data=data, allow_redirects=False
            )
        raise RuntimeError("authorization flow did not reach the redirect_uri")


async def _exchange_code(
    http: aiohttp.ClientSession,
    server: OidcServer,
    client_id: str,
    client_secret: str,
    callback_url: str,
    state: str,
    verifier: str,
) -> dict[str, Any]:
    query = parse_qs(urlsplit(callback_url).query)
    if "error" in query:
        raise RuntimeError(f"authorization failed: {query}")
    if query.get("state") != [state]:
        raise RuntimeError(f"state mismatch in callback: {callback_url}")
    status, body = await _token_request(
        http,
        server,
        {
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": server.redirect_uri,
            "code_verifier": verifier,
            "client_id": client_id,
            "client_secret": client_secret,
        },
    )
    if status != 200 or "refresh_token" not in body:
        raise RuntimeError(f"code exchange failed ({status}): {body}")
    return body


async def _token_request(
    http: aiohttp.ClientSession, server: OidcServer, form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(server.token_endpoint, data=form) as resp:
        body: dict[str, Any] = await resp.json(content_type=None)
        return resp.status, body


async def refresh_grant(
    server: OidcServer, client_id: str, client_secret: str, refresh_token: str
) -> tuple[int, dict[str, Any]]:
    """POST grant_type=refresh_token; return (HTTP status, JSON body).

    On 200 the body is the new token set and ``refresh_token`` is CONSUMED
    (rotation). On failure the body is an OAuth error, e.g.
    ``{"error": "invalid_grant", ...}``.
    """
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        return await _token_request(http, server, form)


async def refresh_works(
    server: OidcServer, client_id: str, client_secret: str, refresh_token: str
) -> bool:
    """True if the provider accepts ``refresh_token`` right now.

    DESTRUCTIVE: a successful probe consumes the token and the new token set
    is thrown away, so the grant cannot be refreshed again (and replaying the
    probed token revokes the grant). Use refresh_grant() to keep the new
    tokens, or token_active() to check without consuming.
    """
    status, _ = await refresh_grant(server, client_id, client_secret, refresh_token)
    return status == 200


async def token_active(
    server: OidcServer, client_id: str, client_secret: str, token: str
) -> bool:
    """Non-destructive check via RFC 7662 introspection (access or refresh)."""
    form = {"token": token, "client_id": client_id, "client_secret": client_secret}
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(server.introspection_endpoint, data=form) as resp,
    ):
        resp.raise_for_status()
        body = await resp.json(content_type=None)
        return body.get("active") is True


async def revoke_token(
    server: OidcServer, client_id: str, client_secret: str, token: str
) -> None:
    """RFC 7009 revocation; revoking a refresh token revokes its whole grant."""
    form = {"token": token, "client_id": client_id, "client_secret": client_secret}
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(server.revocation_endpoint, data=form) as resp,
    ):
        resp.raise_for_status()
