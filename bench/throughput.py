"""Refresh throughput: tokend at its default concurrency against the limit.

N integrations, all due at once, each refreshed once against the fake
endpoint (its own process, answering at once). Rounds alternate the limit
(bench/limit_loop.py: the same database work and POST with no scheduling)
and `tokend run` (defaults, except the per-provider rate limit, raised so
that it does not cap the figure). The rate is taken over the middle 80% of
refreshes (by transaction start time), as are the CPU figures. With
--compare, each round also runs tokend from another checkout (before and
after a change, side by side).

    python -m bench.throughput [--size 10000] [--rounds 3] [--compare TREE]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench import harness as h


@dataclass
class Run:
    kind: str
    rate: float
    seconds: float
    client_us: float
    pg_us: float
    endpoint_us: float
    statements: float
    transactions: float


async def _wait_done(
    conn: asyncpg.Connection,
    n: int,
    since: float,
    probes: list[tuple[int, float, float, float]],
    cpu: tuple[h.PgCpu, h.Endpoint],
    client: h.Tokend | subprocess.Popen[bytes],
    timeout_s: float,
) -> None:
    pg_cpu, endpoint = cpu
    deadline = time.monotonic() + timeout_s
    import psutil

    ps = psutil.Process(client.proc.pid if isinstance(client, h.Tokend) else client.pid)
    while time.monotonic() < deadline:
        done = await conn.fetchval(
            "SELECT count(*) FROM rmm_integrations WHERE updated_at > to_timestamp($1)",
            since,
        )
        t = ps.cpu_times()
        probes.append(
            (done, t.user + t.system, pg_cpu.seconds(), endpoint.cpu_seconds())
        )
        if done >= n:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only {probes[-1][0]} of {n} refreshed in {timeout_s} s")


def _window_cpu(
    probes: list[tuple[int, float, float, float]], n: int
) -> tuple[float, float, float]:
    """CPU µs per refresh between the probes nearest 10% and 90% done."""
    low = min(probes, key=lambda p: abs(p[0] - 0.1 * n))
    high = min(probes, key=lambda p: abs(p[0] - 0.9 * n))
    count = high[0] - low[0]
    if count <= 0:
        return float("nan"), float("nan"), float("nan")
    return tuple(  # type: ignore[return-value]
        (high[i] - low[i]) / count * 1e6 for i in (1, 2, 3)
    )


def _limit_loop(dsn: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "bench.limit_loop", "--dsn", dsn]
    return subprocess.Popen(command, cwd=h.ROOT)


def procrastinate_worker(dsn: str, concurrency: int = 32) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "bench.procrastinate_worker", "--dsn", dsn]
    command += ["--concurrency", str(concurrency)]
    return subprocess.Popen(command, cwd=h.ROOT, stderr=subprocess.DEVNULL)


async def defer_jobs(
    dsn: str, jobs: list[tuple[uuid.UUID, uuid.UUID, float | None]]
) -> None:
    """One procrastinate job per refresh, at its deadline (None: now), in
    deadline order, with procrastinate's own API."""
    from bench.procrastinate_worker import TASK, make_app

    app = make_app(dsn)
    async with app.open_async():
        task = app.tasks[TASK]
        for tenant, integration, due in jobs:
            when = None if due is None else datetime.fromtimestamp(due, UTC)
            await task.configure(schedule_at=when).defer_async(
                tenant=str(tenant), integration=str(integration)
            )


async def one_run(
    kind: str,
    pg: h.EmbeddedPostgres,
    endpoint: h.Endpoint,
    n: int,
    workdir: Path,
    source: Path | None = None,
) -> Run:
    dsn = pg.dsn()
    conn = await asyncpg.connect(dsn)
    watch = await h.observer(dsn)
    try:
        seeded = await h.seed_due(conn, endpoint, n, due_from=time.time() - 60)
        since = time.time()
        await h.flush_stats(watch)
        before = await h.db_counters(watch)
        if kind == "procrastinate":
            # Deferring a job per refresh is part of what a job costs.
            await defer_jobs(dsn, [(t, i, None) for t, i, _ in seeded])
        probes: list[tuple[int, float, float, float]] = []
        cpu = (h.PgCpu(pg), endpoint)
        if kind == "limit":
            proc = _limit_loop(dsn)
            try:
                await _wait_done(conn, n, since, probes, cpu, proc, 600)
            finally:
                proc.wait(60)
        elif kind == "procrastinate":
            proc = procrastinate_worker(dsn)
            try:
                await _wait_done(conn, n, since, probes, cpu, proc, 600)
            finally:
                proc.terminate()
                proc.wait(60)
        else:
            doc = h.config_doc(dsn, workdir, providers={"rate_per_s": 1_000_000.0})
            config = h.write_toml(workdir / "tokend.toml", doc)
            log = workdir / f"tokend-{time.time():.0f}.log"
            daemon = h.Tokend(config, log, source if kind == "compared" else None)
            try:
                await _wait_done(conn, n, since, probes, cpu, daemon, 600)
            finally:
                daemon.stop()
        await h.flush_stats(watch)
        # Less the progress probes this benchmark ran in tokend's database.
        spent = await h.db_counters(watch) - before
        spent -= h.DbCounters(len(probes), len(probes), 0, 0)
        stamps = [
            r[0]
            for r in await conn.fetch(
                "SELECT extract(epoch FROM updated_at)::float8 FROM rmm_integrations"
                " ORDER BY updated_at"
            )
        ]
        low, high = stamps[int(0.1 * n)], stamps[int(0.9 * n) - 1]
        rate = (int(0.9 * n) - int(0.1 * n) - 1) / (high - low)
        client_us, pg_us, endpoint_us = _window_cpu(probes, n)
        return Run(
            kind,
            rate,
            stamps[-1] - stamps[0],
            client_us,
            pg_us,
            endpoint_us,
            spent.statements / n,
            (spent.commits + spent.rollbacks) / n,
        )
    finally:
        await conn.close()
        await watch.close()


async def main(size: int, rounds: int, compare: Path | None) -> None:
    print(f"# refresh throughput, {size} integrations due at once; {h.machine()}")
    kinds = ["limit", "tokend"] + (["compared"] if compare else [])
    if compare:
        print(f"# compared: tokend from {compare}")
    runs: list[Run] = []
    with h.postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        await h.prepare(pg.dsn())
        endpoint = h.Endpoint()
        try:
            for _ in range(rounds):
                for kind in kinds:
                    run = await one_run(kind, pg, endpoint, size, Path(tmp), compare)
                    runs.append(run)
                    print(f"  {kind:<7} {run.rate:8.0f} refreshes/s", file=sys.stderr)
        finally:
            endpoint.close()
    rows = []
    for kind in kinds:
        mine = [r for r in runs if r.kind == kind]
        rows.append(
            [
                kind,
                h.median([r.rate for r in mine]),
                " ".join(f"{r.rate:.0f}" for r in mine),
                h.median([r.client_us for r in mine]),
                h.median([r.pg_us for r in mine]),
                h.median([r.endpoint_us for r in mine]),
                h.median([r.statements for r in mine]),
                h.median([r.transactions for r in mine]),
            ]
        )
    rounds_run = [runs[i : i + len(kinds)] for i in range(0, len(runs), len(kinds))]
    ratios = [r[1].rate / r[0].rate for r in rounds_run]
    print()
    print(
        h.table(
            [
                "loop",
                "refreshes/s (median)",
                "each round",
                "client CPU µs/refresh",
                "Postgres CPU µs",
                "endpoint CPU µs",
                "statements/refresh",
                "transactions/refresh",
            ],
            rows,
        )
    )
    print()
    print(
        f"tokend / limit, same round: {' '.join(f'{r:.2f}' for r in ratios)};"
        f" median {h.median(ratios):.2f} (target >= 0.8)"
    )
    if compare:
        others = [r[2].rate / r[0].rate for r in rounds_run]
        print(
            f"compared / limit, same round: {' '.join(f'{r:.2f}' for r in others)};"
            f" median {h.median(others):.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="integrations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare", type=Path, help="also run tokend from this checkout"
    )
    args = parser.parse_args()
    asyncio.run(main(args.size, args.rounds, args.compare))
