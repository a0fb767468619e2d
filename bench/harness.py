"""What every benchmark needs: a Postgres with pg_stat_statements, the fake
token endpoint in its own process, seeded integrations, tokend as a real
process, CPU and database counters, and a table printer.

Everything listens on loopback only. Figures are meant to be read as ratios
of runs made side by side in one process tree on one machine.
"""

from __future__ import annotations

import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import psutil

from tokend.credentials import Credentials
from tokend.embedded import EmbeddedPostgres
from tokend.migrate import migrate
from tokend.secrets import APP
from tokend.secrets.cipher import Cipher, decode_key

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret"
SECRET_KEY = base64.b64encode(b"b" * 32).decode()
ROOT = Path(__file__).resolve().parent.parent


def cipher() -> Cipher:
    return Cipher({"k1": decode_key(SECRET_KEY, "k1")}, "k1")


# -- Postgres -------------------------------------------------------------


@contextmanager
def postgres() -> Iterator[EmbeddedPostgres]:
    """An embedded server with pg_stat_statements loaded (the wheel ships
    it; it must be preloaded, so the server is restarted once)."""
    pg = EmbeddedPostgres().start()
    try:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import asyncio, asyncpg, sys\n"
                "async def main():\n"
                "    c = await asyncpg.connect(sys.argv[1])\n"
                '    await c.execute("ALTER SYSTEM SET shared_preload_libraries'
                " = 'pg_stat_statements'\")\n"
                '    await c.execute("ALTER SYSTEM SET pg_stat_statements.track'
                " = 'all'\")\n"
                "    await c.close()\n"
                "asyncio.run(main())",
                pg.dsn(),
            ],
            check=True,
        )
        pg.restart()
        yield pg
    finally:
        pg.cleanup()


OBSERVER = "bench_observer"


async def prepare(dsn: str) -> None:
    """tokend's schema in the server's `postgres` database, and a separate
    database for the benchmark's own queries, so that they are not counted
    with tokend's."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await migrate(conn, host_table=True)
        await conn.execute(f"CREATE DATABASE {OBSERVER}")
    finally:
        await conn.close()
    conn = await observer(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()


async def observer(dsn: str) -> asyncpg.Connection:
    """A connection to the observer's database (same server)."""
    return await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/" + OBSERVER)


def postgres_pids(pg: EmbeddedPostgres) -> list[int]:
    """The postmaster and its children (backends, background workers)."""
    pid_line = (pg.data / "postmaster.pid").read_text().split("\n", 1)[0]
    master = psutil.Process(int(pid_line))
    return [master.pid, *(child.pid for child in master.children(recursive=True))]


class PgCpu:
    """CPU seconds spent by the whole server, including backends that have
    exited meanwhile (their time is folded into the postmaster's children)."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        pid_line = (pg.data / "postmaster.pid").read_text().split("\n", 1)[0]
        self.master = psutil.Process(int(pid_line))

    def seconds(self) -> float:
        times = self.master.cpu_times()
        total = times.user + times.system + times.children_user
        total += times.children_system
        for child in self.master.children(recursive=True):
            try:
                t = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total


# -- database counters ----------------------------------------------------


@dataclass
class DbCounters:
    statements: int
    commits: int
    rollbacks: int
    tuples_returned: int

    def __sub__(self, other: DbCounters) -> DbCounters:
        return DbCounters(
            self.statements - other.statements,
            self.commits - other.commits,
            self.rollbacks - other.rollbacks,
            self.tuples_returned - other.tuples_returned,
        )


async def db_counters(
    conn: asyncpg.Connection, database: str = "postgres"
) -> DbCounters:
    """Statements (pg_stat_statements, top level, utility statements such as
    BEGIN and COMMIT included) and transactions (pg_stat_database) so far in
    `database`; `conn` is the observer's (see `observer`)."""
    statements = await conn.fetchval(
        """SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
           WHERE toplevel
             AND dbid = (SELECT oid FROM pg_database WHERE datname = $1)""",
        database,
    )
    row = await conn.fetchrow(
        """SELECT xact_commit, xact_rollback, tup_returned FROM pg_stat_database
           WHERE datname = $1""",
        database,
    )
    assert row is not None
    return DbCounters(int(statements), row[0], row[1], row[2])


async def flush_stats(conn: asyncpg.Connection) -> None:
    # Backends report their transaction counts at most once a second when
    # busy: wait for that, then read a fresh snapshot.
    await anyio.sleep(1.1)
    await conn.execute("SELECT pg_stat_clear_snapshot()")


async def statement_breakdown(
    conn: asyncpg.Connection, database: str = "postgres", limit: int = 20
) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        """SELECT calls, regexp_replace(query, '\\s+', ' ', 'g') AS q
           FROM pg_stat_statements
           WHERE toplevel
             AND dbid = (SELECT oid FROM pg_database WHERE datname = $1)
           ORDER BY calls DESC LIMIT $2""",
        database,
        limit,
    )
    return [(r["calls"], r["q"][:110]) for r in rows]


# -- the fake token endpoint ----------------------------------------------


class Endpoint:
    """`python -m tokend.fake_endpoint` in its own process (its CPU is then
    not the client's)."""

    def __init__(self, expires_in_s: int = 3600) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokend.fake_endpoint",
                "--client",
                f"{CLIENT_ID}:{CLIENT_SECRET}",
                "--expires-in",
                str(expires_in_s),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url: str = orjson.loads(line)["url"]

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    async def grants(self, count: int) -> list[dict[str, Any]]:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.url}/_admin/grant",
                json={"client_id": CLIENT_ID, "count": count},
            ) as response,
        ):
            doc: list[dict[str, Any]] = await response.json()
            return doc

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- seeding --------------------------------------------------------------


def iso_sql(expr: str) -> str:
    """SQL rendering an epoch-seconds expression the way tokend writes it."""
    return (
        f"to_char(to_timestamp({expr}) AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\')'
    )


async def seed_rows(
    conn: asyncpg.Connection,
    count: int,
    *,
    table: str = "rmm_integrations",
    due_from: float,
    due_over_s: float,
    lifecycle: bool = True,
    instance_url: str = "http://127.0.0.1:1",
) -> None:
    """`count` active integrations, deadlines spread evenly over
    [due_from, due_from + due_over_s), seeded in SQL (fast at 1M rows)."""
    due = f"{float(due_from)} + {float(due_over_s)} * i::float8 / {count}"
    if lifecycle:
        settings = f"""jsonb_build_object('tokenLifecycle', jsonb_build_object(
            'status', 'scheduled', 'scheduleNonce', 1 + i % 500,
            'expiresAt', {iso_sql(f"{due} + 900")},
            'nextRefreshAt', {iso_sql(due)},
            'lastScheduleSource', 'oauth_connected',
            'consecutiveFailures', 0, 'reconnectRequired', false,
            'ownerId', 'bench'))"""
    else:
        settings = "'{}'::jsonb"
    await conn.execute(
        f"""INSERT INTO {table}
              (tenant, integration_id, provider, instance_url, settings)
            SELECT gen_random_uuid(), gen_random_uuid(), 'ninjaone', $1, {settings}
            FROM generate_series(0, {count - 1}) AS i""",
        instance_url,
    )


async def seed_due(
    conn: asyncpg.Connection,
    endpoint: Endpoint,
    count: int,
    *,
    due_from: float,
    due_over_s: float = 0.0,
) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
    """`count` integrations with real grants at the endpoint and encrypted
    credentials, due over [due_from, due_from + due_over_s): (tenant,
    integration id, deadline) of each."""
    await conn.execute("TRUNCATE rmm_integrations, tokend_secrets, tokend_events")
    grants = await endpoint.grants(count)
    seal = cipher()
    expires_ms = int((time.time() + 3600) * 1000)
    secrets = []
    keys = []
    now = time.time()
    for client_name, value in (
        ("ninjaone_client_id", CLIENT_ID),
        ("ninjaone_client_secret", CLIENT_SECRET),
    ):
        secrets.append(
            (APP, client_name, *seal.encrypt(APP, client_name, value.encode()))
        )
    rows = []
    for i, grant in enumerate(grants):
        tenant, integration = uuid.uuid4(), uuid.uuid4()
        due = due_from + (due_over_s * i / count if count else 0.0)
        keys.append((tenant, integration, due))
        creds = Credentials(
            grant["access_token"],
            grant["refresh_token"],
            expires_ms,
            endpoint.url,
            {},
        ).dumps()
        name = "ninjaone_credentials"
        secrets.append((tenant, name, *seal.encrypt(tenant, name, creds)))
        lifecycle = {
            "status": "scheduled",
            "scheduleNonce": 1,
            "expiresAt": _iso(expires_ms / 1000),
            "nextRefreshAt": _iso(due),
            "lastScheduledAt": _iso(now),
            "lastScheduleSource": "oauth_connected",
            "consecutiveFailures": 0,
            "reconnectRequired": False,
            "ownerId": "bench",
        }
        settings = orjson.dumps({"tokenLifecycle": lifecycle}).decode()
        rows.append((tenant, integration, "ninjaone", endpoint.url, True, settings))
    await conn.copy_records_to_table(
        "tokend_secrets",
        records=secrets,
        columns=["tenant", "name", "key_id", "nonce", "ciphertext"],
    )
    await conn.copy_records_to_table(
        "rmm_integrations",
        records=rows,
        columns=[
            "tenant",
            "integration_id",
            "provider",
            "instance_url",
            "is_active",
            "settings",
        ],
    )
    await conn.execute("VACUUM ANALYZE rmm_integrations")
    await conn.execute("VACUUM ANALYZE tokend_secrets")
    return keys


def _iso(ts: float) -> str:
    from tokend.lifecycle import iso

    text = iso(ts)
    assert text is not None
    return text


# -- tokend as a process --------------------------------------------------


def config_doc(dsn: str, state_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """tokend's defaults, except what a benchmark must set: the DSN, a key,
    loopback http for the fake endpoint, no HTTP server of its own."""
    doc: dict[str, Any] = {
        "database": {"dsn": dsn},
        "http": {"enabled": False},
        "secrets": {"key": SECRET_KEY},
        "daemon": {"state_dir": str(state_dir)},
        "providers": {"ninjaone": {"allow_http_loopback": True}},
    }
    for name, values in sections.items():
        if name == "providers":
            doc["providers"]["ninjaone"].update(values)
        else:
            doc.setdefault(name, {}).update(values)
    return doc


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        lines.append(f"[{prefix}]")
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {_toml(value)}")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}", value)

    for name, values in doc.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return repr(value)


def source_env(source: Path | None) -> dict[str, str]:
    """The environment of a tokend process. `source`: another checkout whose
    `tokend` package it runs instead of this one (before/after runs); the
    process must then start in a folder that holds no `tokend` of its own,
    as a module run takes its working folder first (see `source_cwd`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), str(ROOT)])
    return env


def source_cwd(source: Path | None) -> str | None:
    return None if source is None else tempfile.gettempdir()


class Tokend:
    """`tokend run` as a real process, logging JSON at its configured level
    to a file (as under systemd, logging is part of the cost)."""

    def __init__(self, config: Path, log: Path, source: Path | None = None) -> None:
        self.log = log
        command = [sys.executable, "-m", "tokend", "run", "--config", str(config)]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=source_env(source),
                cwd=source_cwd(source),
            )
        self.spy: subprocess.Popen[bytes] | None = None
        profile = os.environ.get("BENCH_PYSPY")
        if profile:
            # Profiling aid: collapsed stacks of tokend, written when it exits.
            spy = str(Path(sys.executable).parent / "py-spy")
            pid = str(self.proc.pid)
            self.spy = subprocess.Popen(
                [spy, "record", "-r", "250", "-f", "raw", "-o", profile, "-p", pid],
                stdout=subprocess.DEVNULL,
            )
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.spy is not None:
            self.spy.wait(30)

    def log_lines(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.log.read_bytes().splitlines():
            try:
                found.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
        return found


# -- figures --------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (it reads in a terminal too)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
        for i, h in enumerate(headers)
    ]
    out = [
        "| "
        + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
        + " |"
    ]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        out.append(
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
            + " |"
        )
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores, load {load:.2f}, Python "
        f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


async def wait_for(
    probe: Callable[[], bool], timeout_s: float, every_s: float = 0.02
) -> None:
    """Poll `probe` until true; RuntimeError after `timeout_s`."""

    deadline = time.monotonic() + timeout_s
    while True:
        if probe():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s} s")
        await anyio.sleep(every_s)


async def wait_for_async(
    probe: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.02
) -> None:
    """Poll the async `probe` until true; RuntimeError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s} s")
        await anyio.sleep(every_s)
