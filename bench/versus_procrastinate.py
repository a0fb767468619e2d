"""tokend against the alternative a user would pick: procrastinate (a
Postgres job queue from PyPI) with one deferred job per refresh at its
deadline, on the same database and fake endpoint.

The job refreshes exactly as the limit loop does (bench/limit_loop.py);
procrastinate runs with its defaults but a concurrency of 32, and jobs are
deferred in deadline order (its best case). tokend runs with its defaults
but an unlimited per-provider rate, as the job queue has none.

1. N integrations due within one minute: lateness.
2. N due at once: throughput, and database statements and transactions per
   refresh (for procrastinate including the job's deferral).
3. Nothing due, N and 10 N integrations (jobs a day away): database load.

    python -m bench.versus_procrastinate [--size 10000] [--idle 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import asyncpg

from bench import harness as h
from bench.deadlines import LEAD_S, Lateness, lateness, started_at, wait_count
from bench.idle import one_size
from bench.procrastinate_worker import make_app
from bench.throughput import Run, defer_jobs, one_run, procrastinate_worker

UNLIMITED = 1_000_000.0
# Deferring N jobs one by one takes a while: deadlines start after it.
DEFER_S_PER_JOB = 0.004


async def procrastinate_lateness(
    dsn: str, endpoint: h.Endpoint, size: int, over_s: float
) -> Lateness:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE procrastinate_jobs CASCADE")
        due_from = time.time() + LEAD_S + size * DEFER_S_PER_JOB
        seeded = await h.seed_due(
            conn, endpoint, size, due_from=due_from, due_over_s=over_s
        )
        await defer_jobs(dsn, seeded)
        if time.time() > due_from:
            raise RuntimeError("deferring took longer than planned: raise the lead")
        worker = procrastinate_worker(dsn)
        try:
            await wait_count(
                conn,
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
                size,
                due_from - time.time() + over_s + 600,
            )
        finally:
            worker.terminate()
            worker.wait(60)
        started = await started_at(conn)
    finally:
        await conn.close()
    return lateness([(due, started[(t, i)]) for t, i, due in seeded], None)


async def tokend_lateness(
    dsn: str, endpoint: h.Endpoint, size: int, over_s: float
) -> Lateness:
    from bench.deadlines import tokend_lateness as run

    return await run(dsn, endpoint, size, over_s, UNLIMITED)


async def procrastinate_idle(
    pg: h.EmbeddedPostgres, size: int, duration_s: float
) -> float:
    """Statements a minute with `size` jobs scheduled a day away."""
    dsn = pg.dsn()
    conn = await asyncpg.connect(dsn)
    watch = await h.observer(dsn)
    try:
        await conn.execute("TRUNCATE procrastinate_jobs CASCADE")
        # As deferring would, in one statement (deferring 100k one by one
        # takes minutes): the same rows procrastinate_defer_jobs_v1 writes.
        await conn.execute(
            """INSERT INTO procrastinate_jobs
                   (queue_name, task_name, args, scheduled_at)
               SELECT 'default', 'refresh',
                      jsonb_build_object('tenant', gen_random_uuid()::text,
                                         'integration', gen_random_uuid()::text),
                      now() + interval '1 day'
               FROM generate_series(1, $1)""",
            size,
        )
        await conn.execute("VACUUM ANALYZE procrastinate_jobs")
        worker = procrastinate_worker(dsn)
        try:
            await anyio.sleep(3.0)
            before = await _counters(watch)
            await anyio.sleep(duration_s)
            after = await _counters(watch)
        finally:
            worker.terminate()
            worker.wait(60)
    finally:
        await conn.close()
        await watch.close()
    return (after.statements - before.statements) / ((duration_s + 1.1) / 60)


async def _counters(watch: asyncpg.Connection) -> h.DbCounters:
    await h.flush_stats(watch)
    return await h.db_counters(watch)


async def main(size: int, over_s: float, idle_s: float) -> None:
    print(f"# tokend against procrastinate, {size} integrations; {h.machine()}")
    with h.postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.dsn()
        await h.prepare(dsn)
        app = make_app(dsn)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        endpoint = h.Endpoint()
        try:
            late = {
                "tokend": await tokend_lateness(dsn, endpoint, size, over_s),
                "procrastinate": await procrastinate_lateness(
                    dsn, endpoint, size, over_s
                ),
            }
            runs: dict[str, Run] = {}
            for kind in ("tokend", "procrastinate"):
                runs[kind] = await one_run(kind, pg, endpoint, size, Path(tmp))
            idle: dict[tuple[str, int], float] = {}
            for n in (size, 10 * size):
                row = await one_size(pg, n, idle_s)
                idle[("tokend", n)] = float(row[1])  # type: ignore[arg-type]
                idle[("procrastinate", n)] = await procrastinate_idle(pg, n, idle_s)
        finally:
            endpoint.close()
    _report(size, late, runs, idle)


def _report(
    size: int,
    late: dict[str, Lateness],
    runs: dict[str, Run],
    idle: dict[tuple[str, int], float],
) -> None:
    rows = []
    for kind in ("tokend", "procrastinate"):
        found, run = late[kind], runs[kind]
        rows.append(
            [
                kind,
                h.percentile(found.total, 50),
                h.percentile(found.total, 99),
                max(found.total),
                run.rate,
                run.statements,
                run.transactions,
                idle[(kind, size)],
                idle[(kind, 10 * size)],
            ]
        )
    print()
    print(
        h.table(
            [
                "",
                "lateness p50 s",
                "p99 s",
                "max s",
                "refreshes/s",
                "statements/refresh",
                "transactions/refresh",
                f"idle statements/min, {size:,}",
                f"{10 * size:,}",
            ],
            rows,
        )
    )
    t, p = rows[0], rows[1]
    print(
        f"\np99 lateness: procrastinate / tokend = {p[2] / t[2]:.0f}x (target >= 10)"
        f"\nthroughput: tokend / procrastinate = {t[4] / p[4]:.1f}x (target >= 3)"
        f"\nstatements: tokend / procrastinate = {t[5] / p[5]:.2f}"
        f", transactions {t[6] / p[6]:.2f} (target <= 0.5)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="integrations")
    parser.add_argument("--over", type=float, default=60.0, help="seconds")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds a window")
    args = parser.parse_args()
    anyio.run(
        main, args.size, args.over, args.idle, backend_options={"use_uvloop": True}
    )
