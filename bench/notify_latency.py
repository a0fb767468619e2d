"""Notification latency: from `pg_notify` in another session to the heap
updated.

A daemon leads in this process over N integrations (with credentials and a
lifecycle); another connection sends `connected` for one of them at a time
and waits until the daemon's schedule holds the new entry: the latency is
the whole path (delivery, parsing, the reschedule transaction under the
integration's lock, the heap). One at a time, so each is measured alone.

    python -m bench.notify_latency [--size 10000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import anyio
import asyncpg

from bench import harness as h
from tokend.config import parse
from tokend.daemon import Daemon
from tokend.store import IntegrationKey


async def main(size: int) -> None:
    print(f"# notification latency, {size} notifications; {h.machine()}")
    with h.postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.dsn()
        await h.prepare(dsn)
        endpoint = h.Endpoint()
        conn = await asyncpg.connect(dsn)
        try:
            # Deadlines an hour away: nothing is refreshed meanwhile.
            pairs = await h.seed_due(conn, endpoint, size, due_from=time.time() + 3600)
            keys = [IntegrationKey(t, i) for t, i, _ in pairs]
            doc = h.config_doc(dsn, Path(tmp))
            daemon = Daemon(parse(doc, {}, "bench"))
            latencies = await _measure(daemon, conn, keys)
        finally:
            await conn.close()
            endpoint.close()
    latencies.sort()
    rows = [
        [
            len(latencies),
            h.percentile(latencies, 50) * 1000,
            h.percentile(latencies, 90) * 1000,
            h.percentile(latencies, 99) * 1000,
            latencies[-1] * 1000,
        ]
    ]
    print()
    print(h.table(["notifications", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
    print(f"\np99 {h.percentile(latencies, 99) * 1000:.2f} ms (target < 5 ms)")


async def _measure(
    daemon: Daemon, conn: asyncpg.Connection, keys: list[IntegrationKey]
) -> list[float]:
    updated = anyio.Event()
    waiting: list[IntegrationKey | None] = [None]
    put = daemon.schedule.put

    def on_put(key: IntegrationKey, deadline: float, nonce: int, p: str) -> bool:
        result = put(key, deadline, nonce, p)
        if key == waiting[0]:
            updated.set()
        return result

    daemon.schedule.put = on_put  # type: ignore[method-assign]
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await h.wait_for(lambda: daemon.last_load is not None, 120)
        order = list(keys)
        random.shuffle(order)
        for key in order:
            updated = anyio.Event()
            waiting[0] = key
            started = time.perf_counter()
            await conn.execute(
                "SELECT tokend_notify('connected', $1, $2)",
                key.tenant,
                key.integration_id,
            )
            with anyio.fail_after(10):
                await updated.wait()
            latencies.append(time.perf_counter() - started)
        daemon.stop()
    return latencies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="notifications")
    args = parser.parse_args()
    anyio.run(main, args.size, backend_options={"use_uvloop": True})
