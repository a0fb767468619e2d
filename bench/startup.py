"""Start-up and memory: from gaining leadership to a full heap, and the
resident memory each scheduled integration keeps.

For each size (10k, 100k, 1M active integrations with a lifecycle), rounds
alternate fresh processes on the same table: the bare baseline (one asyncpg
fetch of key and deadline, the deadline computed in SQL, then heapify) and
tokend's daemon (its leader, LISTEN, load, backfill, heap; the clock stops
when the heap is full, before the statuses are counted for the metrics).
With --compare, tokend from another checkout runs too. Memory per
integration is the slope of resident memory after the load between the two
largest sizes; the peak during the load is shown too. The load must read no
secrets: reads of the secrets table during it are counted.

    python -m bench.startup [--sizes 10000,100000,1000000] [--rounds 3]
                            [--compare TREE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import harness as h

BARE = """
SELECT tenant, integration_id,
       date_part('epoch',
               (settings #>> '{{tokenLifecycle,nextRefreshAt}}')::timestamptz)
FROM {table} WHERE is_active"""


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    # Writing 5 resets the peak resident size (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def _probe_bare(dsn: str, table: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    gc.collect()
    before = _rss()
    _reset_peak()
    started = time.perf_counter()
    rows = await conn.fetch(BARE.format(table=table))
    heap = [(r[2], (r[0], r[1])) for r in rows]
    del rows
    heapq.heapify(heap)
    seconds = time.perf_counter() - started
    await conn.close()
    return {
        "seconds": seconds,
        "entries": len(heap),
        "rss": _rss() - before,
        "peak": _peak() - before,
    }


async def _probe_tokend(dsn: str, table: str) -> dict[str, Any]:
    import anyio

    from tokend.config import parse
    from tokend.daemon import Daemon

    doc = h.config_doc(dsn, Path(tempfile.gettempdir()))
    doc["database"]["integrations_table"] = table
    daemon = Daemon(parse(doc, {}, "bench"))
    marks: dict[str, float] = {}
    memory: dict[str, int] = {}
    set_role = daemon.leader._set_role
    resync = daemon.resync

    def on_role(role: str, **more: Any) -> None:
        if role == "leader":
            gc.collect()
            memory["before"] = _rss()
            _reset_peak()
            marks["leader"] = time.perf_counter()
        set_role(role, **more)

    def full() -> None:
        if "loaded" not in marks:
            marks["loaded"] = time.perf_counter()
            memory["after"] = _rss()
            memory["peak"] = _peak()
            memory["entries"] = len(daemon.schedule)

    async def on_resync(**options: Any) -> None:
        await resync(**options)
        full()
        daemon.stop()

    daemon.leader._set_role = on_role  # type: ignore[method-assign]
    daemon.resync = on_resync  # type: ignore[method-assign]
    count = getattr(daemon, "_count", None)
    if count is not None:
        # The heap is full before the statuses are counted (for metrics).

        async def on_count(conn: Any) -> None:
            full()
            await count(conn)

        daemon._count = on_count  # type: ignore[attr-defined]
    with anyio.fail_after(600):
        await daemon.run()
    return {
        "seconds": marks["loaded"] - marks["leader"],
        "entries": memory["entries"],
        "rss": memory["after"] - memory["before"],
        "peak": memory["peak"] - memory["before"],
    }


def _run_probe(
    kind: str, dsn: str, table: str, source: Path | None = None
) -> dict[str, Any]:
    probe = "bare" if kind == "bare" else "tokend"
    out = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--probe", probe, dsn, table],
        cwd=h.source_cwd(source) or h.ROOT,
        env=h.source_env(source),
        capture_output=True,
        check=False,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} probe failed: {out.stderr.decode()[-3000:]}")
    result: dict[str, Any] = orjson.loads(out.stdout.splitlines()[-1])
    return result


async def _secret_reads(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    value = await conn.fetchval(
        """SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
           FROM pg_stat_user_tables WHERE relname = 'tokend_secrets'"""
    )
    return int(value)


async def main(sizes: list[int], rounds: int, compare: Path | None) -> None:
    print(f"# start-up and memory; {h.machine()}")
    kinds = ["bare", "tokend"] + (["compared"] if compare else [])
    if compare:
        print(f"# compared: tokend from {compare}")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    secret_reads = 0
    with h.postgres() as pg:
        dsn = pg.dsn()
        await h.prepare(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            for size in sizes:
                table = f"bench_{size}"
                await conn.execute(
                    f"CREATE TABLE {table} (LIKE rmm_integrations INCLUDING ALL)"
                )
                started = time.monotonic()
                # Deadlines an hour away and later: nothing falls due.
                await h.seed_rows(
                    conn,
                    size,
                    table=table,
                    due_from=time.time() + 3600,
                    due_over_s=3600,
                )
                await conn.execute(f"VACUUM ANALYZE {table}")
                print(
                    f"  seeded {size} in {time.monotonic() - started:.1f} s",
                    file=sys.stderr,
                )
            for _ in range(rounds):
                for size in sizes:
                    for kind in kinds:
                        before = await _secret_reads(conn)
                        source = compare if kind == "compared" else None
                        result = _run_probe(kind, dsn, f"bench_{size}", source)
                        await asyncio.sleep(0.7)
                        if kind == "tokend":
                            secret_reads += await _secret_reads(conn) - before
                        results.setdefault((kind, size), []).append(result)
                        print(
                            f"  {kind:<6} {size:>8} {result['seconds']:.2f} s",
                            file=sys.stderr,
                        )
        finally:
            await conn.close()
    _report(sizes, kinds, results, secret_reads)


def _report(
    sizes: list[int],
    kinds: list[str],
    results: dict[tuple[str, int], list[dict[str, Any]]],
    secret_reads: int,
) -> None:
    rows = []
    for size in sizes:
        bare = results[("bare", size)]
        for kind in kinds:
            mine = results[(kind, size)]
            ratios = [
                t["seconds"] / b["seconds"] for b, t in zip(bare, mine, strict=True)
            ]
            rows.append(
                [
                    size,
                    kind,
                    h.median([r["seconds"] for r in mine]),
                    h.median(ratios),
                    " ".join(f"{r:.2f}" for r in ratios),
                    h.median([r["rss"] / size for r in mine]),
                    h.median([r["peak"] / size for r in mine]),
                    mine[0]["entries"],
                ]
            )
    print()
    print(
        h.table(
            [
                "integrations",
                "loader",
                "seconds",
                "/ bare",
                "each round",
                "B/row kept",
                "B/row peak",
                "heap entries",
            ],
            rows,
        )
    )
    if len(sizes) >= 2:
        small, large = sizes[-2], sizes[-1]
        for kind in kinds:
            slopes = [
                (b["rss"] - a["rss"]) / (large - small)
                for a, b in zip(
                    results[(kind, small)], results[(kind, large)], strict=True
                )
            ]
            print(
                f"\n{kind}: resident memory per integration, slope {small:,} to"
                f" {large:,}: median {h.median(slopes):.0f} B"
                f" (rounds {' '.join(f'{s:.0f}' for s in slopes)})"
                + (" (target < 200 B)" if kind == "tokend" else "")
            )
    print(f"\nreads of tokend_secrets during tokend's loads: {secret_reads}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare", type=Path, help="also run tokend from this checkout"
    )
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        kind, dsn, table = args.probe
        probe = _probe_bare if kind == "bare" else _probe_tokend
        import uvloop

        print(orjson.dumps(uvloop.run(probe(dsn, table))).decode())
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        asyncio.run(main(sizes, args.rounds, args.compare))
