"""Helpers shared by the tests: seeding integrations, reading what tokend
wrote, and running the daemon in-process or as a real process."""

from __future__ import annotations

import atexit
import base64
import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import asyncpg
import orjson

from tokend.config import Config, parse
from tokend.credentials import Credentials
from tokend.daemon import Daemon
from tokend.fake_endpoint import FakeTokenEndpoint
from tokend.secrets import APP
from tokend.secrets.postgres import PostgresSecretStore, postgres_store
from tokend.store import IntegrationKey

CLIENT_ID = "test-client"
CLIENT_SECRET = "test-client-secret-" + "s3cr3t"
SECRET_KEY = base64.b64encode(b"k" * 32).decode()
T = TypeVar("T")
# The configs of one test share a state dir (the journal) under this one:
# two configs of a test compare equal unless the test changes them. Tests
# that run several processes give each its own.
_STATE_ROOT = Path(tempfile.mkdtemp(prefix="tokend-test-state-"))
atexit.register(shutil.rmtree, _STATE_ROOT, True)


def _state_dir() -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    name = hashlib.sha1(test.encode()).hexdigest()[:16] if test else "outside"
    return str(_STATE_ROOT / name)


def config_doc(dsn: str, **overrides: dict[str, Any]) -> dict[str, Any]:
    """A config for tests: refresh about two seconds after a connect."""
    doc: dict[str, Any] = {
        "database": {"dsn": dsn, "pool_size": 8, "statement_timeout_s": 10.0},
        "leader": {
            "lock_timeout_s": 1.0,
            "heartbeat_interval_s": 1.0,
            "heartbeat_timeout_s": 0.8,
            "lease_s": 3.0,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 1.0,
        },
        "scheduler": {
            "buffer_s": 3598.0,
            "min_delay_s": 0.5,
            "spread_s": 0.0,
            "resync_interval_s": 60.0,
            "max_sleep_s": 1.0,
        },
        "retry": {"initial_s": 0.5, "max_s": 2.0},
        "http": {"enabled": False},
        "secrets": {"key": SECRET_KEY},
        "daemon": {
            "shutdown_grace_s": 5.0,
            "state_dir": _state_dir(),
            "inflight_wait_s": 2.0,
        },
        "providers": {
            "ninjaone": {"allow_http_loopback": True, "request_timeout_s": 3.0}
        },
    }
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    return doc


def make_config(dsn: str, **overrides: dict[str, Any]) -> Config:
    return parse(config_doc(dsn, **overrides), {}, "test")


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    """Write a config dict as TOML (the subset the tests use)."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml(value)}")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}", value)

    for section, values in doc.items():
        table(section, values)
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    timeout_s: float = 15.0,
    every_s: float = 0.05,
) -> T:
    """Poll `probe` (sync or async) until it gives something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {value!r}")
        await anyio.sleep(every_s)


@dataclass
class World:
    """A test database, the fake endpoint, and ways to seed and inspect."""

    dsn: str
    conn: asyncpg.Connection
    endpoint: FakeTokenEndpoint
    secrets: PostgresSecretStore

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, endpoint: FakeTokenEndpoint) -> AsyncIterator[World]:
        conn = await asyncpg.connect(dsn)
        store = postgres_store(make_config(dsn).secrets, conn)
        world = cls(dsn, conn, endpoint, store)
        await store.put(APP, "ninjaone_client_id", CLIENT_ID.encode())
        await store.put(APP, "ninjaone_client_secret", CLIENT_SECRET.encode())
        try:
            yield world
        finally:
            await conn.close()

    def config(self, **overrides: dict[str, Any]) -> Config:
        return make_config(self.dsn, **overrides)

    async def connect(
        self,
        *,
        notify: bool = True,
        expires_in_s: float = 3600,
        settings: dict[str, Any] | None = None,
        credentials: bytes | None = None,
        instance_url: str | None = None,
        provider: str = "ninjaone",
        secret_name: str = "ninjaone_credentials",
    ) -> IntegrationKey:
        """Seed an integration as the host app's OAuth connect would."""
        key = IntegrationKey(uuid.uuid4(), uuid.uuid4())
        url = instance_url or self.endpoint.url
        if credentials is None:
            grant = self.endpoint.grant(CLIENT_ID)
            expires_ms = int((time.time() + expires_in_s) * 1000)
            credentials = Credentials(
                grant["access_token"], grant["refresh_token"], expires_ms, url, {}
            ).dumps()
        if credentials:
            await self.secrets.put(key.tenant, secret_name, credentials)
        await self.conn.execute(
            "INSERT INTO rmm_integrations (tenant, integration_id, provider,"
            " instance_url, settings) VALUES ($1, $2, $3, $4, $5::jsonb)",
            key.tenant,
            key.integration_id,
            provider,
            url,
            orjson.dumps(settings or {}).decode(),
        )
        if notify:
            await self.notify("connected", key)
        return key

    async def notify(self, event: str, key: IntegrationKey) -> None:
        await self.conn.execute(
            "SELECT tokend_notify($1, $2, $3)", event, key.tenant, key.integration_id
        )

    async def lifecycle(self, key: IntegrationKey) -> dict[str, Any] | None:
        raw = await self.conn.fetchval(
            "SELECT settings -> 'tokenLifecycle' FROM rmm_integrations"
            " WHERE tenant = $1 AND integration_id = $2",
            key.tenant,
            key.integration_id,
        )
        return None if raw is None else orjson.loads(raw)  # type: ignore[no-any-return]

    async def credentials(
        self, key: IntegrationKey, secret_name: str = "ninjaone_credentials"
    ) -> Credentials:
        raw = await self.secrets.get(key.tenant, secret_name)
        assert raw is not None
        return Credentials.parse(raw)

    async def events(self, key: IntegrationKey | None = None) -> list[dict[str, Any]]:
        rows = await self.conn.fetch("SELECT payload FROM tokend_events ORDER BY id")
        found = [orjson.loads(r["payload"]) for r in rows]
        if key is not None:
            found = [e for e in found if e["integration_id"] == str(key.integration_id)]
        return found

    def refreshes(self, result: str = "ok") -> list[Any]:
        return [entry for entry in self.endpoint.log if entry.result == result]


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    """Run a daemon in-process until the block ends; yields once it leads
    and has loaded its integrations."""
    daemon = Daemon(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)

        async def ready() -> bool:
            return daemon.leader.role == "leader" and daemon.last_load is not None

        await eventually(ready, timeout_s=20)
        try:
            yield daemon
        finally:
            daemon.stop()


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a moment, at least)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """`tokend run` as a real process with its own config file.

    With `http_port`, the config must listen there; `get` then asks it.
    """

    def __init__(
        self, config_path: Path, log_path: Path, http_port: int | None = None
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        env: dict[str, str] | None = None,
        *,
        args: tuple[str, ...] = ("--log-format", "json", "--log-level", "debug"),
        stderr: int | None = None,
    ) -> Process:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tokend",
                    "run",
                    "--config",
                    str(self.config_path),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT if stderr is None else stderr,
                env={**os.environ, **(env or {})},
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    async def exited(self, timeout_s: float) -> int:
        """The exit status, waiting without blocking the test's event loop
        (which may serve the process's token endpoint)."""
        assert self.proc is not None
        proc = self.proc
        await eventually(lambda: proc.poll() is not None, timeout_s)
        return proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def get(self, path: str) -> tuple[int, Any]:
        """GET from the process's HTTP port: status and JSON (or text)."""
        assert self.http_port is not None
        url = f"http://127.0.0.1:{self.http_port}{path}"
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, orjson.loads(body)
            return response.status, body.decode()

    async def answers(self, path: str) -> tuple[int, Any] | None:
        """Like get, None while nothing listens yet."""
        try:
            return await self.get(path)
        except aiohttp.ClientConnectionError:
            return None

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                lines.append({"message": raw.decode(errors="replace")})
        return lines

    def said(self, message: str) -> list[dict[str, Any]]:
        """The log lines with this message."""
        return [line for line in self.log_lines() if line.get("message") == message]
