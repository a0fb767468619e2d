"""A fake NinjaOne token endpoint, for the demo, the tests and benchmarks.

It behaves like the real one where tokend can tell: form-encoded requests,
JSON answers with `expires_in`, refresh tokens rotated on every use, `400
invalid_grant` for a reused or unknown refresh token, `401 invalid_client`
for a wrong client secret. Optional: a rotation grace period (the previous
refresh token stays valid for N seconds), no rotation at all (answers carry
no refresh_token and the old one stays valid, as RFC 6749 6 allows), reuse
detection (a rotated token used again after its grace revokes its whole
family, as providers that detect token theft do), scripted faults
(`Fault`), one per request in order, and random faults at a given rate.

Every grant is logged with its time, the token sent, the result and the
token issued, so a test can replay each family's chain of refresh tokens.

Run alone: `python -m tokend.fake_endpoint --client ID:SECRET` prints one
JSON line with its URL; the `/_admin/...` routes let another process seed
grants, script faults and read the log. It listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

TOKEN_PATHS = ("/oauth/token", "/ws/oauth/token")


@dataclass
class _Refresh:
    client_id: str
    family: str
    rotated_at: float | None = None
    revoked: bool = False


# Random faults that leave the grant unprocessed: the refresh token sent stays
# valid, as when a provider fails before it commits anything.
RANDOM_FAULTS = ("500", "503", "429", "timeout", "reset", "garbage")


@dataclass
class Fault:
    """What the next token request gets, by `action`:

    - answer: `status`, `body`, `headers` as given;
    - grant: the real grant, its 200 answer altered by `patch` (keys set;
      None is JSON null) and `drop` (keys removed), and sent in two halves
      `chunk_delay_s` apart if that is set;
    - reset: the connection is aborted before any answer;
    - close_early: headers and part of a body, then the connection is cut;
    - hang: no answer, ever;
    - endless: a 200 whose body never ends.

    `before` runs first, given the refresh token presented (a test's hook
    to act between the client's read and its request being served);
    `after_rotation` processes the grant before failing as `action` says.
    """

    action: str = "answer"
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    after_rotation: bool = False
    patch: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    chunk_delay_s: float = 0.0
    before: Callable[[str], Awaitable[None]] | None = None


@dataclass
class LogEntry:
    at: float
    refresh_token: str
    result: str
    new_refresh_token: str | None = None
    family: str | None = None


@dataclass
class Request:
    """Every token request, faulted or not, without any secret value."""

    at: float
    path: str
    client_auth: str
    scope: str | None
    action: str


class FakeTokenEndpoint:
    def __init__(
        self,
        clients: dict[str, str],
        *,
        expires_in_s: int = 3600,
        rotation_grace_s: float = 0.0,
        delay_s: float = 0.0,
        rotate_refresh_tokens: bool = True,
        reuse_detection: bool = False,
    ) -> None:
        self.clients = dict(clients)
        self.expires_in_s = expires_in_s
        self.rotation_grace_s = rotation_grace_s
        self.delay_s = delay_s
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.reuse_detection = reuse_detection
        # Random faults: the share of requests that get one, and the kinds.
        self.fault_rate = 0.0
        self.fault_kinds: tuple[str, ...] = RANDOM_FAULTS
        self.faults: deque[Fault] = deque()
        self.log: list[LogEntry] = []
        self.requests: list[Request] = []
        # Token requests being answered right now.
        self.in_progress = 0
        self._refresh: dict[str, _Refresh] = {}
        self._families: dict[str, list[str]] = {}
        self._access: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        # Set on stop: hanging answers give up, so shutdown does not wait.
        self._stopping = asyncio.Event()
        self.url = ""

    # -- state ------------------------------------------------------------

    def grant(self, client_id: str) -> dict[str, Any]:
        """A new grant, as an OAuth connect would give the host app."""
        return self._issue(client_id, family=secrets.token_hex(8))

    def _issue(
        self, client_id: str, family: str, *, refresh: bool = True
    ) -> dict[str, Any]:
        access = "at_" + secrets.token_urlsafe(24)
        self._access[access] = time.time() + self.expires_in_s
        answer: dict[str, Any] = {
            "access_token": access,
            "expires_in": self.expires_in_s,
            "token_type": "Bearer",
            "scope": "monitoring management offline_access",
        }
        if refresh:
            token = "rt_" + secrets.token_urlsafe(24)
            self._refresh[token] = _Refresh(client_id, family)
            self._families.setdefault(family, []).append(token)
            answer["refresh_token"] = token
        return answer

    def issued(self) -> list[str]:
        """Every access and refresh token handed out so far (for leak scans)."""
        return [*self._access, *self._refresh]

    def refresh_token_valid(self, token: str) -> bool:
        record = self._refresh.get(token)
        return record is not None and self._usable(record, time.time())

    def is_current(self, token: str) -> bool:
        """True if `token` is the newest refresh token of a live family: the
        one a client that lost nothing holds."""
        record = self._refresh.get(token)
        if record is None or record.revoked:
            return False
        return self._families[record.family][-1] == token

    def access_token_valid(self, token: str) -> bool:
        return self._access.get(token, 0.0) > time.time()

    def _usable(self, record: _Refresh, now: float) -> bool:
        if record.revoked:
            return False
        if record.rotated_at is None:
            return True
        return now - record.rotated_at < self.rotation_grace_s

    def rotate(self, token: str, client_id: str) -> tuple[int, dict[str, Any]]:
        """Apply one refresh_token grant; (status, JSON answer)."""
        record = self._refresh.get(token)
        now = time.time()
        if record is None or record.client_id != client_id:
            self.log.append(LogEntry(now, token, "invalid_grant"))
            return 400, {"error": "invalid_grant", "error_description": "unknown"}
        if not self._usable(record, now):
            result = "revoked" if record.revoked else "reused"
            if result == "reused" and self.reuse_detection:
                # Someone replayed a spent token: assume theft, end the family.
                for other in self._families[record.family]:
                    self._refresh[other].revoked = True
            self.log.append(LogEntry(now, token, result, family=record.family))
            return 400, {"error": "invalid_grant", "error_description": result}
        if not self.rotate_refresh_tokens:
            answer = self._issue(client_id, record.family, refresh=False)
            self.log.append(LogEntry(now, token, "ok", None, record.family))
            return 200, answer
        if record.rotated_at is None:
            record.rotated_at = now
        answer = self._issue(client_id, record.family)
        entry = LogEntry(now, token, "ok", answer["refresh_token"], record.family)
        self.log.append(entry)
        return 200, answer

    def family_of(self, token: str) -> str | None:
        record = self._refresh.get(token)
        return None if record is None else record.family

    # -- HTTP -------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        for path in TOKEN_PATHS:
            app.router.add_post(path, self._token)
        app.router.add_post("/_admin/grant", self._admin_grant)
        app.router.add_post("/_admin/faults", self._admin_faults)
        app.router.add_post("/_admin/settings", self._admin_settings)
        app.router.add_get("/_admin/log", self._admin_log)
        app.router.add_post("/_admin/check", self._admin_check)
        app.router.add_post("/_admin/families", self._admin_families)
        return app

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _client(self, request: web.Request, form: Any) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            # RFC 6749 2.3.1: each half is form-urlencoded.
            login, _, password = pair.partition(":")
            client_id, client_secret = unquote(login), unquote(password)
        else:
            client_id = form.get("client_id", "")
            client_secret = form.get("client_secret", "")
        if not client_id or self.clients.get(client_id) != client_secret:
            return None
        return str(client_id)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.in_progress += 1
        try:
            return await self._answer(request)
        finally:
            self.in_progress -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fault = self.faults.popleft() if self.faults else self._random_fault()
        action = fault.action if fault else "grant"
        scope = form.get("scope")
        self.requests.append(
            Request(
                time.time(),
                request.path,
                "basic" if "Authorization" in request.headers else "post",
                scope if isinstance(scope, str) else None,
                action,
            )
        )
        if fault is not None and fault.before is not None:
            await fault.before(str(form.get("refresh_token", "")))
        delay = fault.delay_s if fault else self.delay_s
        if delay:
            await asyncio.sleep(delay)
            if request.transport is None or request.transport.is_closing():
                # The client gave up while we dawdled: nothing is processed.
                return web.Response(status=499)
        if fault is not None and action != "grant" and not fault.after_rotation:
            return await self._fault(request, fault)
        if form.get("grant_type") != "refresh_token":
            return _json(400, {"error": "unsupported_grant_type"})
        client_id = self._client(request, form)
        if client_id is None:
            return _json(401, {"error": "invalid_client"})
        status, answer = self.rotate(str(form.get("refresh_token", "")), client_id)
        if fault is None or (action == "grant" and status != 200):
            return _json(status, answer)
        if action == "grant":
            return await self._altered(request, fault, answer)
        return await self._fault(request, fault)

    async def _altered(
        self, request: web.Request, fault: Fault, answer: dict[str, Any]
    ) -> web.StreamResponse:
        for key in fault.drop:
            answer.pop(key, None)
        answer.update(fault.patch)
        body = orjson.dumps(answer)
        if not fault.chunk_delay_s:
            return _json(200, answer)
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        half = len(body) // 2
        await response.write(body[:half])
        await asyncio.sleep(fault.chunk_delay_s)
        await response.write(body[half:])
        await response.write_eof()
        return response

    def _random_fault(self) -> Fault | None:
        if not self.fault_rate or random.random() >= self.fault_rate:
            return None
        kind = random.choice(self.fault_kinds)
        if kind == "timeout":
            return Fault(action="hang")
        if kind == "reset":
            return Fault(action="reset")
        if kind == "garbage":
            return Fault(status=200, body=b"<html>upstream error</html>")
        headers = {"Retry-After": "1"} if kind == "429" else {}
        return Fault(status=int(kind), body=b"{}", headers=headers)

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.action == "hang":
            await self._stopping.wait()
        if fault.action == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fault.action == "endless":
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            await response.prepare(request)
            while True:
                await response.write(b'{"padding": "' + b"x" * 65536)
        if fault.action == "close_early":
            response = web.StreamResponse(status=200)
            response.content_length = 1000
            response.content_type = "application/json"
            await response.prepare(request)
            await response.write(b'{"access_token": "')
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.Response(status=fault.status, body=fault.body, headers=fault.headers)

    async def _admin_grant(self, request: web.Request) -> web.Response:
        doc = await request.json()
        if "count" in doc:
            # Benchmarks seed thousands of grants in one request.
            count = int(doc["count"])
            return _json(200, [self.grant(doc["client_id"]) for _ in range(count)])
        return _json(200, self.grant(doc["client_id"]))

    async def _admin_faults(self, request: web.Request) -> web.Response:
        for item in await request.json():
            body = item.pop("body", "")
            self.faults.append(Fault(body=body.encode(), **item))
        return _json(200, {"queued": len(self.faults)})

    async def _admin_settings(self, request: web.Request) -> web.Response:
        doc = await request.json()
        for name in (
            "expires_in_s",
            "rotation_grace_s",
            "delay_s",
            "reuse_detection",
            "fault_rate",
        ):
            if name in doc:
                setattr(self, name, doc[name])
        if "fault_kinds" in doc:
            unknown = set(doc["fault_kinds"]) - set(RANDOM_FAULTS)
            if unknown:
                return _json(400, {"error": f"unknown fault kinds {sorted(unknown)}"})
            self.fault_kinds = tuple(doc["fault_kinds"])
        return _json(200, {"ok": True})

    async def _admin_log(self, request: web.Request) -> web.Response:
        """The log from entry `since` on (all of it by default)."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return _json(400, {"error": "since: expected an integer"})
        return _json(200, [entry.__dict__ for entry in self.log[since:]])

    async def _admin_families(self, request: web.Request) -> web.Response:
        """For each refresh token asked about: its family, whether it is
        usable now, and the newest token of its family."""
        now = time.time()
        answer: dict[str, dict[str, Any] | None] = {}
        for token in await request.json():
            record = self._refresh.get(token)
            if record is None:
                answer[token] = None
                continue
            answer[token] = {
                "family": record.family,
                "valid": self._usable(record, now),
                "newest": self._families[record.family][-1],
                "revoked": record.revoked,
            }
        return _json(200, answer)

    async def _admin_check(self, request: web.Request) -> web.Response:
        doc = await request.json()
        return _json(
            200,
            {
                "refresh_token_valid": self.refresh_token_valid(
                    doc.get("refresh_token", "")
                ),
                "access_token_valid": self.access_token_valid(
                    doc.get("access_token", "")
                ),
            },
        )


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(doc), content_type="application/json"
    )


async def _serve(args: argparse.Namespace) -> None:
    clients = dict(pair.split(":", 1) for pair in args.client)
    endpoint = FakeTokenEndpoint(
        clients,
        expires_in_s=args.expires_in,
        rotation_grace_s=args.grace,
        reuse_detection=args.reuse_detection,
    )
    url = await endpoint.start(args.host, args.port)
    print(orjson.dumps({"url": url}).decode(), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await endpoint.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client", action="append", default=[], help="ID:SECRET")
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--grace", type=float, default=0.0)
    parser.add_argument(
        "--reuse-detection",
        action="store_true",
        help="a spent refresh token used again revokes its whole family",
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
