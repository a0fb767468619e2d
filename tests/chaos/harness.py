"""The chaos run: several `tokend run` processes on one Postgres, a few
hundred integrations with short-lived tokens on the fake endpoint (its own
process, rotation and reuse detection on), and a driver that for a bounded
time kills and restarts processes, terminates their backends, restarts
Postgres and injects provider faults. Then it lets things settle, stops
everything gracefully, and checks every integration against the provider's
own log."""

from __future__ import annotations

import json
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
import asyncpg

from tests.conftest import PgServer
from tests.faults import at, fresh_database, spawn
from tests.helpers import CLIENT_ID, CLIENT_SECRET, Process, make_config
from tokend.credentials import Credentials
from tokend.embedded import free_port
from tokend.secrets import APP
from tokend.secrets.postgres import postgres_store

LIFETIME_S = 30
# Refresh ten to thirteen seconds into a token's thirty: twenty seconds of
# slack for takeovers, in-flight waits, restarts and provider faults.
SCHEDULER = {
    "buffer_s": 20.0,
    "min_delay_s": 1.0,
    "spread_s": 3.0,
    "max_sleep_s": 1.0,
    "resync_interval_s": 30.0,
}
LEADER = {
    "lock_timeout_s": 1.0,
    "heartbeat_interval_s": 1.0,
    "heartbeat_timeout_s": 0.8,
    "lease_s": 3.0,
    "reconnect_initial_s": 0.1,
    "reconnect_max_s": 1.0,
    "keepalive_idle_s": 2,
    "keepalive_interval_s": 1,
    "keepalive_count": 2,
    "tcp_user_timeout_s": 4,
}
# A restarted process must replay its journal within this; the driver
# restarts a killed process within 1.5 s, as systemd would.
INFLIGHT_WAIT_S = 8.0
# A kill this long before a rotation can still lose its answer: the request
# was out, the provider handled it after the process died.
BEFORE_ROTATION_S = 0.05


@dataclass
class Kill:
    at: float
    process: str
    leader: bool


@dataclass
class Span:
    kind: str
    start: float
    end: float = 0.0


@dataclass
class Report:
    mode: str
    seconds: float
    integrations: int
    counts: Counter[str] = field(default_factory=Counter)
    takeovers_s: list[float] = field(default_factory=list)
    windows_ms: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lost_unexplained: list[str] = field(default_factory=list)
    false_reconnects: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    duplicates_unexplained: list[str] = field(default_factory=list)
    lapses: list[str] = field(default_factory=list)
    exits: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        def spread(values: list[float], unit: str) -> str:
            if not values:
                return "none"
            ordered = sorted(values)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            return (
                f"n={len(values)} p50={statistics.median(values):.3f}{unit}"
                f" p99={p99:.3f}{unit} max={max(values):.3f}{unit}"
            )

        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return [
            f"chaos [{self.mode}] {self.seconds:.0f} s of faults,"
            f" {self.integrations} integrations",
            f"  injected/observed: {faults}",
            f"  unplanned exits (restarted): {dict(self.exits) or 'none'}",
            f"  takeover after a leader's SIGKILL: {spread(self.takeovers_s, ' s')}",
            "  answer received -> durable in the journal:"
            f" {spread(self.windows_ms, ' ms')}",
            f"  lost tokens: {len(self.lost)}"
            f" (outside a kill's in-flight window: {len(self.lost_unexplained)})",
            *[f"    {line}" for line in self.lost],
            f"  false reconnect-required: {len(self.false_reconnects)}",
            *[f"    {line}" for line in self.false_reconnects],
            f"  duplicate refreshes of one token: {len(self.duplicates)}"
            f" (outside a kill's in-flight window:"
            f" {len(self.duplicates_unexplained)})",
            *[f"    {line}" for line in self.duplicates],
            f"  access tokens lapsed while provider and database were up:"
            f" {len(self.lapses)}",
            *[f"    {line}" for line in self.lapses],
        ]


class Chaos:
    def __init__(
        self,
        tmp_path: Path,
        pg: PgServer,
        *,
        grace_s: float,
        seconds: float,
        integrations: int = 300,
        processes: int = 3,
        seed: int | None = None,
    ) -> None:
        self.tmp = tmp_path
        self.pg = pg
        self.grace_s = grace_s
        self.seconds = seconds
        self.count = integrations
        self.rng = random.Random(seed)
        self.names = [f"p{i}" for i in range(processes)]
        self.procs: dict[str, Process] = {}
        self.ports: dict[str, int] = {}
        self.held: set[str] = set()
        self.kills: list[Kill] = []
        self.spans: list[Span] = []
        self.report = Report(
            "grace on" if grace_s else "grace off", seconds, integrations
        )
        self.endpoint: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.dsn = ""
        self.keys: list[tuple[uuid.UUID, uuid.UUID]] = []
        self.log: list[dict[str, Any]] = []
        self.session: aiohttp.ClientSession | None = None
        self._background: anyio.abc.TaskGroup | None = None
        self.chaos_end = 0.0

    # -- setting up -----------------------------------------------------------

    async def run(self) -> Report:
        self.dsn = await fresh_database(self.pg)
        self._start_endpoint()
        try:
            async with aiohttp.ClientSession() as self.session:
                await self._seed()
                self._start_processes()
                await self._wait_for_a_leader()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._supervise)
                    await self._drive()
                    await self._settle()
                    tg.cancel_scope.cancel()
                await self._stop_all()
                await self._check()
        finally:
            for process in self.procs.values():
                process.stop()
            if self.endpoint is not None:
                self.endpoint.terminate()
                self.endpoint.wait(10)
                assert self.endpoint.stdout is not None
                self.endpoint.stdout.close()
        return self.report

    def _start_endpoint(self) -> None:
        args = [
            sys.executable,
            "-m",
            "tokend.fake_endpoint",
            "--client",
            f"{CLIENT_ID}:{CLIENT_SECRET}",
            "--expires-in",
            str(LIFETIME_S),
            "--grace",
            str(self.grace_s),
            "--reuse-detection",
        ]
        self.endpoint = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self.endpoint.stdout is not None
        self.url = json.loads(self.endpoint.stdout.readline())["url"]

    async def _admin(self, method: str, path: str, body: Any = None) -> Any:
        assert self.session is not None
        async with self.session.request(
            method,
            self.url + path,
            json=body,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            response.raise_for_status()
            return await response.json()

    async def _seed(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            store = postgres_store(make_config(self.dsn).secrets, conn)
            await store.put(APP, "ninjaone_client_id", CLIENT_ID.encode())
            await store.put(APP, "ninjaone_client_secret", CLIENT_SECRET.encode())
            rows = []
            for _ in range(self.count):
                grant = await self._admin(
                    "POST", "/_admin/grant", {"client_id": CLIENT_ID}
                )
                tenant, integration = uuid.uuid4(), uuid.uuid4()
                expires_ms = int((time.time() + grant["expires_in"]) * 1000)
                credentials = Credentials(
                    grant["access_token"],
                    grant["refresh_token"],
                    expires_ms,
                    self.url,
                    {},
                )
                await store.put(tenant, "ninjaone_credentials", credentials.dumps())
                rows.append((tenant, integration, "ninjaone", self.url))
                self.keys.append((tenant, integration))
            # No lifecycle yet: the first leader backfills them all.
            await conn.executemany(
                "INSERT INTO rmm_integrations (tenant, integration_id, provider,"
                " instance_url, settings) VALUES ($1, $2, $3, $4, '{}')",
                rows,
            )
        finally:
            await conn.close()

    def _start_processes(self) -> None:
        for name in self.names:
            port = free_port()
            self.ports[name] = port
            self.procs[name] = spawn(
                self.tmp,
                self.dsn,
                name,
                database={"pool_size": 8, "statement_timeout_s": 5.0},
                leader=LEADER,
                scheduler=SCHEDULER,
                retry={"initial_s": 0.5, "max_s": 3.0, "expiring_warning_s": 5.0},
                daemon={"inflight_wait_s": INFLIGHT_WAIT_S, "shutdown_grace_s": 5.0},
                http={"enabled": True, "listen": f"127.0.0.1:{port}"},
                providers={
                    "ninjaone": {
                        "allow_http_loopback": True,
                        "request_timeout_s": 2.0,
                        "rate_per_s": 200.0,
                    }
                },
            ).start()

    async def _role(self, name: str) -> str | None:
        assert self.session is not None
        try:
            async with self.session.get(
                f"http://127.0.0.1:{self.ports[name]}/status",
                timeout=aiohttp.ClientTimeout(total=2),
            ) as response:
                role: str = (await response.json())["role"]
                return role
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _leader(self) -> str | None:
        for name in self.names:
            if await self._role(name) == "leader":
                return name
        return None

    async def _wait_for_a_leader(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = await self._leader()
            if leader is not None:
                return leader
            await anyio.sleep(0.2)
        raise AssertionError(f"no leader within {timeout_s} s")

    # -- the driver -----------------------------------------------------------

    async def _drive(self) -> None:
        actions: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (4.0, self._kill_leader),
            (1.0, self._kill_follower),
            (1.0, self._restart_leader_gracefully),
            (2.0, self._terminate_backends),
            (0.6, self._restart_postgres),
            (1.2, self._provider_faults),
        ]
        weights = [w for w, _ in actions]
        # Every kind of fault once, in a random order, then a weighted mix.
        first = [a for _, a in actions]
        self.rng.shuffle(first)
        end = time.monotonic() + self.seconds
        async with anyio.create_task_group() as background:
            self._background = background
            while time.monotonic() < end:
                await anyio.sleep(self.rng.uniform(1.0, 3.0))
                if first:
                    action = first.pop()
                else:
                    (action,) = self.rng.choices([a for _, a in actions], weights)
                await action()
        self._background = None

    async def _kill(self, name: str, leader: bool) -> None:
        process = self.procs[name]
        self.held.add(name)
        try:
            self.kills.append(Kill(time.time(), name, leader))
            self.report.counts["kill_leader" if leader else "kill_follower"] += 1
            await anyio.to_thread.run_sync(process.kill)
            await anyio.sleep(self.rng.uniform(0.2, 1.5))
            process.start()
        finally:
            self.held.discard(name)

    async def _kill_leader(self) -> None:
        leader = await self._leader()
        if leader is not None:
            await self._kill(leader, True)

    async def _kill_follower(self) -> None:
        leader = await self._leader()
        followers = [n for n in self.names if n != leader]
        await self._kill(self.rng.choice(followers), False)

    async def _restart_leader_gracefully(self) -> None:
        name = await self._leader()
        if name is None:
            return
        process = self.procs[name]
        self.held.add(name)
        try:
            self.report.counts["sigterm_leader"] += 1
            process.signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(process.wait, 30.0)
            if code != 0:
                self.report.exits[f"{name} exit {code} after SIGTERM"] += 1
            await anyio.sleep(self.rng.uniform(0.2, 1.0))
            process.start()
        finally:
            self.held.discard(name)

    async def _terminate_backends(self) -> None:
        which = self.rng.choice(["tokend-leader", "tokend", "tokend-marks", "all"])
        names = (
            ["tokend-leader", "tokend", "tokend-marks"] if which == "all" else [which]
        )
        self.report.counts[f"terminate_{which}"] += 1
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except (OSError, asyncpg.PostgresError):
            return
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = ANY($1::text[])",
                names,
            )
        finally:
            await conn.close()

    async def _restart_postgres(self) -> None:
        assert self.pg.embedded is not None
        self.report.counts["restart_postgres"] += 1
        span = Span("postgres", time.time())
        self.spans.append(span)
        try:
            await anyio.to_thread.run_sync(self.pg.embedded.stop)
            await anyio.sleep(self.rng.uniform(0.5, 2.0))
        finally:
            await anyio.to_thread.run_sync(self.pg.embedded.start)
            span.end = time.time()

    async def _provider_faults(self) -> None:
        if any(s.kind == "provider" and not s.end for s in self.spans):
            return
        self.report.counts["provider_fault_episodes"] += 1
        span = Span("provider", time.time())
        self.spans.append(span)

        async def episode() -> None:
            try:
                await self._admin("POST", "/_admin/settings", {"fault_rate": 0.5})
                await anyio.sleep(self.rng.uniform(2.0, 6.0))
            finally:
                with anyio.CancelScope(shield=True):
                    await self._admin("POST", "/_admin/settings", {"fault_rate": 0.0})
                span.end = time.time()

        assert self._background is not None
        self._background.start_soon(episode)

    async def _supervise(self) -> None:
        """Restart a process that exited on its own, as systemd would."""
        while True:
            await anyio.sleep(0.25)
            for name, process in self.procs.items():
                assert process.proc is not None
                code = process.proc.poll()
                if name in self.held or code is None:
                    continue
                self.report.exits[f"exit {code}"] += 1
                await anyio.sleep(0.5)
                process.start()

    # -- the end --------------------------------------------------------------

    async def _fetch_log(self) -> None:
        self.log += await self._admin("GET", f"/_admin/log?since={len(self.log)}")

    async def _settle(self) -> None:
        """Wait until every integration rotated once after the faults, or was
        declared reconnect-required."""
        assert self.pg.embedded is not None
        self.chaos_end = time.time()
        await self._wait_for_a_leader()
        deadline = time.monotonic() + 3 * LIFETIME_S
        while time.monotonic() < deadline:
            await anyio.sleep(2.0)
            await self._fetch_log()
            fresh = {e["family"] for e in self.log if e["at"] > self.chaos_end}
            families = await self._families()
            stuck = [
                key
                for key, info in families.items()
                if info["family"] not in fresh and not info["reconnect_required"]
            ]
            if not stuck:
                return
        raise AssertionError(f"{len(stuck)} integrations never settled")

    async def _stored(self) -> dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]]:
        """Each integration's stored refresh token and lifecycle."""
        conn = await asyncpg.connect(self.dsn)
        try:
            store = postgres_store(make_config(self.dsn).secrets, conn)
            rows = await conn.fetch(
                "SELECT tenant, integration_id, settings -> 'tokenLifecycle' AS lc"
                " FROM rmm_integrations"
            )
            stored = {}
            for row in rows:
                raw = await store.get(row["tenant"], "ninjaone_credentials")
                assert raw is not None
                lifecycle = json.loads(row["lc"]) if row["lc"] else {}
                stored[(row["tenant"], row["integration_id"])] = {
                    "token": Credentials.parse(raw).refresh_token,
                    "reconnect_required": bool(lifecycle.get("reconnectRequired")),
                }
            return stored
        finally:
            await conn.close()

    async def _families(self) -> dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]]:
        stored = await self._stored()
        tokens = [info["token"] for info in stored.values()]
        found = await self._admin("POST", "/_admin/families", tokens)
        for info in stored.values():
            info.update(found[info["token"]])
        return stored

    async def _stop_all(self) -> None:
        for name, process in self.procs.items():
            process.signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(process.wait, 30.0)
            if code != 0:
                self.report.exits[f"{name} exit {code} at the final SIGTERM"] += 1

    # -- the checks -----------------------------------------------------------

    async def _check(self) -> None:
        await self._fetch_log()
        lines = {name: p.log_lines() for name, p in self.procs.items()}
        self._measure(lines)
        families = await self._families()
        window_s = max(self.report.windows_ms, default=0.0) / 1000 + 0.05
        by_token: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in self.log:
            by_token[entry["refresh_token"]].append(entry)
        issued = {e["new_refresh_token"]: e for e in self.log if e["result"] == "ok"}
        self.report.counts["refreshes_ok"] = len(issued)

        for (tenant, _), info in families.items():
            name = str(tenant)[:8]
            current = info["newest"] == info["token"] and not info["revoked"]
            if current and info["reconnect_required"]:
                self.report.false_reconnects.append(name)
            if current:
                continue
            # The rotation whose answer never reached the store.
            reused = [
                e
                for e in by_token[info["token"]]
                if e["result"] in ("reused", "revoked")
            ]
            lost = (
                issued.get(info["newest"]) if not reused else by_token[info["token"]][0]
            )
            self._explain(
                self.report.lost, self.report.lost_unexplained, name, lost, window_s
            )

        for token, uses in by_token.items():
            if len(uses) > 1:
                name = f"{uses[0]['family'] or token[:8]} used {len(uses)}x"
                self._explain(
                    self.report.duplicates,
                    self.report.duplicates_unexplained,
                    name,
                    uses[0],
                    window_s,
                )
        self._lapses(families)

    def _explain(
        self,
        found: list[str],
        unexplained: list[str],
        name: str,
        rotation: dict[str, Any] | None,
        window_s: float,
    ) -> None:
        if rotation is None:
            found.append(f"{name}: no rotation found in the provider's log")
            unexplained.append(name)
            return
        r = rotation["at"]
        kills = [
            k
            for k in self.kills
            if k.leader and r - BEFORE_ROTATION_S <= k.at <= r + window_s
        ]
        if kills:
            k = kills[0]
            found.append(
                f"{name}: rotated at {r:.3f}, leader {k.process} SIGKILLed"
                f" {1000 * (k.at - r):+.1f} ms from it"
                f" (window {1000 * window_s:.0f} ms)"
            )
        else:
            found.append(f"{name}: rotated at {r:.3f}, no kill inside its window")
            unexplained.append(name)

    def _lapses(
        self, families: dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]]
    ) -> None:
        issued: dict[str, list[float]] = defaultdict(list)
        for entry in self.log:
            if entry["result"] == "ok":
                issued[entry["family"]].append(entry["at"])
        checked_at = time.time()
        for info in families.values():
            if info["newest"] != info["token"] or info["revoked"]:
                continue  # lost: counted as such
            times = sorted(issued[info["family"]])
            for before, after in zip(times, [*times[1:], checked_at], strict=True):
                if after - before <= LIFETIME_S:
                    continue
                excused = any(
                    s.start <= after and (s.end or checked_at) >= before
                    for s in self.spans
                )
                if not excused:
                    self.report.lapses.append(
                        f"{info['family']}: none issued from {before:.1f}"
                        f" to {after:.1f} ({after - before:.1f} s)"
                    )

    def _measure(self, lines: dict[str, list[dict[str, Any]]]) -> None:
        for process_lines in lines.values():
            for line in process_lines:
                if line.get("message") == "refresh succeeded" and line.get(
                    "journal_ms"
                ):
                    self.report.windows_ms.append(float(line["journal_ms"]))
        gained = sorted(
            (at(line), name)
            for name, process_lines in lines.items()
            for line in process_lines
            if line.get("message") == "leadership gained"
        )
        for kill in self.kills:
            if not kill.leader:
                continue
            after = [t for t, name in gained if t >= kill.at and name != kill.process]
            if after:
                self.report.takeovers_s.append(after[0] - kill.at)
