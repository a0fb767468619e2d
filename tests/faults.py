"""Tools for the fault tests and the chaos suite: a TCP proxy that cuts or
stalls connections, a Postgres of a test's own (to restart), and `tokend
run` processes with their logs."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import PgServer, with_database
from tests.helpers import Process, config_doc, write_config
from tokend.embedded import EmbeddedPostgres, free_port
from tokend.keys import leader_key


class _Pipe(asyncio.Protocol):
    """One direction's socket of a proxied connection."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.peer: _Pipe | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.pipes.add(self)
        if self.proxy.stalled:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.pipes.discard(self)
        # A partition hides a close from the other side, as a dead link would.
        if not self.proxy.stalled:
            self.close_peer()

    def close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def attach(self, peer: _Pipe) -> None:
        self.peer = peer
        assert peer.transport is not None
        for chunk in self.early:
            peer.transport.write(chunk)
        self.early.clear()


class TcpProxy:
    """127.0.0.1 TCP proxy on a thread of its own (a test that blocks its
    own loop, waiting for a process, must not stall the proxy).

    `cut()` aborts every connection; `stall()` is a partition: nothing is
    forwarded, closes are not passed on, and new connections hang; `heal()`
    ends it. Upstream sockets have a tiny receive buffer, so a server that
    sends to a partitioned client soon sees a closed window, and its
    `tcp_user_timeout` can end the connection as it would over a dead link.
    """

    def __init__(self, target_port: int, rcvbuf: int = 4096) -> None:
        self.target_port = target_port
        self.rcvbuf = rcvbuf
        self.stalled = False
        self.pipes: set[_Pipe] = set()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await self._loop.create_server(
            lambda: _Client(self), "127.0.0.1", 0
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in list(self.pipes):
            assert pipe.transport is not None
            pipe.transport.abort()

    async def _connect_upstream(self, client: _Client) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, ("127.0.0.1", self.target_port))
            _, upstream = await self._loop.create_connection(
                lambda: _Pipe(self), sock=sock
            )
        except OSError:
            sock.close()
            if client.transport is not None:
                client.transport.abort()
            return
        client.attach(upstream)
        upstream.attach(client)
        upstream.peer = client
        if client.closed and not self.stalled:
            upstream.close_peer()
            assert upstream.transport is not None
            upstream.transport.close()

    def url(self, dsn: str) -> str:
        """`dsn` with its port replaced by the proxy's."""
        return dsn.replace(f":{self.target_port}/", f":{self.port}/")

    def cut(self) -> None:
        async def cut() -> None:
            for pipe in list(self.pipes):
                assert pipe.transport is not None
                pipe.transport.abort()

        self._call(cut())

    def stall(self) -> None:
        async def stall() -> None:
            self.stalled = True
            for pipe in self.pipes:
                assert pipe.transport is not None
                pipe.transport.pause_reading()

        self._call(stall())

    def heal(self) -> None:
        async def heal() -> None:
            self.stalled = False
            for pipe in list(self.pipes):
                assert pipe.transport is not None
                if pipe.peer is not None and pipe.peer.closed:
                    pipe.transport.close()
                else:
                    pipe.transport.resume_reading()

        self._call(heal())


class _Client(_Pipe):
    """The accepted side: connects upstream, then pipes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy._loop.create_task(self.proxy._connect_upstream(self))


@contextmanager
def own_postgres() -> Iterator[PgServer]:
    """A Postgres of the caller's own, to restart or to kill."""
    embedded = EmbeddedPostgres().start()
    server = PgServer(embedded.dsn(), embedded)
    try:
        asyncio.run(server.create_template())
        yield server
    finally:
        embedded.cleanup()


async def fresh_database(server: PgServer) -> str:
    return with_database(server.admin_dsn, await server.create_database())


def spawn(tmp_path: Path, dsn: str, name: str, **overrides: dict[str, Any]) -> Process:
    """A `tokend run` process (not started) with its own config and state."""
    doc = config_doc(dsn, **overrides)
    doc["daemon"]["instance_id"] = name
    if "state_dir" not in overrides.get("daemon", {}):
        doc["daemon"]["state_dir"] = str(tmp_path / f"{name}-state")
    config = write_config(tmp_path / f"{name}.toml", doc)
    return Process(config, tmp_path / f"{name}.log")


def said(process: Process, message: str, **fields: Any) -> list[dict[str, Any]]:
    """The log lines of `process` with this message (and these fields)."""
    return [
        line
        for line in process.log_lines()
        if line.get("message") == message
        and all(line.get(k) == v for k, v in fields.items())
    ]


def at(line: dict[str, Any]) -> float:
    """A log line's time as epoch seconds."""
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


async def lock_holder(
    conn: asyncpg.Connection, lock_name: str = "tokend"
) -> int | None:
    key = leader_key(lock_name)
    pid: int | None = await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2",
        (key >> 32) & 0xFFFFFFFF,
        key & 0xFFFFFFFF,
    )
    return pid


async def backends(conn: asyncpg.Connection, application: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application
    )
    return [r["pid"] for r in rows]


def wait_until(probe: Any, timeout_s: float, every_s: float = 0.05) -> Any:
    """Blocking poll, for code outside an event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)


class PgBouncer:
    """pgbouncer (Debian's package) in front of a Postgres, on loopback."""

    def __init__(
        self,
        target_port: int,
        *,
        mode: str,
        ignore: tuple[str, ...] = (),
        connect_query: str | None = None,
    ) -> None:
        self.target_port = target_port
        self.mode = mode
        self.ignore = ignore
        self.connect_query = connect_query
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tokend-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        binary = shutil.which("pgbouncer")
        assert binary is not None
        target = f"host=127.0.0.1 port={self.target_port}"
        if self.connect_query:
            target += f" connect_query='{self.connect_query}'"
        ini = [
            "[databases]",
            f"* = {target}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'users.txt'}",
            f"pool_mode = {self.mode}",
            f"logfile = {self.dir / 'pgbouncer.log'}",
            f"pidfile = {self.dir / 'pgbouncer.pid'}",
            "default_pool_size = 4",
            # asyncpg sends these on connect; pgbouncer refuses what it
            # does not know unless told to ignore it.
            "ignore_startup_parameters = "
            + ",".join(("extra_float_digits", *self.ignore)),
        ]
        (self.dir / "pgbouncer.ini").write_text("\n".join(ini) + "\n")
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        user = "embedded_postgres" if os.geteuid() == 0 else None
        if user is not None:
            # pgbouncer will not run as root; its files must be readable.
            entry = pwd.getpwnam(user)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.proc = subprocess.Popen(
            [binary, str(self.dir / "pgbouncer.ini")],
            user=user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._listening, timeout_s=10)
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dsn: str) -> str:
        return dsn.replace(f":{self.target_port}/", f":{self.port}/")
