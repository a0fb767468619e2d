"""Idle cost: a leader with N integrations and nothing due.

For each size, `tokend run` (defaults) loads N integrations whose deadlines
are a day away, then sits idle for --duration seconds: the database
statements and transactions it causes a minute (pg_stat_statements,
pg_stat_database) and its own CPU seconds an hour. The periodic resync
(every 5 min by default) rarely falls in the window, so one is triggered
(a `resync` notification) and measured alone, then amortized over an hour.

    python -m bench.idle [--sizes 10000,100000] [--duration 45]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import asyncpg

from bench import harness as h
from tokend.config import SchedulerConfig


def _loaded(daemon: h.Tokend, times: int) -> bool:
    found = [e for e in daemon.log_lines() if e.get("message") == "integrations loaded"]
    return len(found) >= times


async def _window(
    conn: asyncpg.Connection, pg_cpu: h.PgCpu, daemon: h.Tokend
) -> tuple[h.DbCounters, float, float]:
    await h.flush_stats(conn)
    return await h.db_counters(conn), daemon.cpu_seconds(), pg_cpu.seconds()


async def one_size(
    pg: h.EmbeddedPostgres, size: int, duration_s: float
) -> list[object]:
    dsn = pg.dsn()
    conn = await asyncpg.connect(dsn)
    watch = await h.observer(dsn)
    try:
        await conn.execute("TRUNCATE rmm_integrations, tokend_events")
        await h.seed_rows(conn, size, due_from=time.time() + 86400, due_over_s=3600)
        await conn.execute("VACUUM ANALYZE rmm_integrations")
        with tempfile.TemporaryDirectory() as tmp:
            config = h.write_toml(
                Path(tmp) / "tokend.toml", h.config_doc(dsn, Path(tmp))
            )
            daemon = h.Tokend(config, Path(tmp) / "tokend.log")
            try:
                await h.wait_for(lambda: _loaded(daemon, 1), 300, 0.2)
                await anyio.sleep(1.0)
                pg_cpu = h.PgCpu(pg)
                await watch.execute("SELECT pg_stat_statements_reset()")
                before = await _window(watch, pg_cpu, daemon)
                await anyio.sleep(duration_s)
                after = await _window(watch, pg_cpu, daemon)
                print(f"\n{size} integrations, statements idle:", file=sys.stderr)
                for calls, query in await h.statement_breakdown(watch, limit=8):
                    print(f"  {calls:>5}  {query}", file=sys.stderr)
                await conn.execute(
                    """SELECT pg_notify('tokend', '{"event":"resync"}')"""
                )
                await h.wait_for(lambda: _loaded(daemon, 2), 300, 0.05)
                resynced = await _window(watch, pg_cpu, daemon)
            finally:
                daemon.stop()
    finally:
        await conn.close()
        await watch.close()
    idle = after[0] - before[0]
    minutes = (duration_s + 1.1) / 60
    statements = idle.statements / minutes
    transactions = (idle.commits + idle.rollbacks) / minutes
    cpu_hour = (after[1] - before[1]) / (duration_s + 1.1) * 3600
    pg_hour = (after[2] - before[2]) / (duration_s + 1.1) * 3600
    # Less the notification that asked for it (one statement).
    resync = resynced[0] - after[0] - h.DbCounters(1, 1, 0, 0)
    per_hour = 3600 / SchedulerConfig().resync_interval_s
    return [
        size,
        statements,
        transactions,
        cpu_hour,
        pg_hour,
        resync.statements,
        resync.tuples_returned,
        resynced[1] - after[1],
        statements + resync.statements * per_hour / 60,
        cpu_hour + (resynced[1] - after[1]) * per_hour,
    ]


async def main(sizes: list[int], duration_s: float) -> None:
    print(f"# idle cost, {duration_s:g} s a size; {h.machine()}")
    rows = []
    with h.postgres() as pg:
        await h.prepare(pg.dsn())
        for size in sizes:
            rows.append(await one_size(pg, size, duration_s))
    print()
    print(
        h.table(
            [
                "integrations",
                "statements/min",
                "transactions/min",
                "tokend CPU s/hour",
                "Postgres CPU s/hour",
                "one resync: statements",
                "rows read",
                "tokend CPU s",
                "with resyncs: statements/min",
                "tokend CPU s/hour",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds")
    args = parser.parse_args()
    anyio.run(
        main,
        [int(s) for s in args.sizes.split(",")],
        args.duration,
        backend_options={"use_uvloop": True},
    )
