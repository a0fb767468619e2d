"""Deadline accuracy: N integrations due within one minute, the provider
answering at once, refreshed by `tokend run` with its defaults (the
per-provider rate limit too, unless --rate says otherwise).

Lateness is each refresh's start (the lifecycle's lastRefreshAttemptAt)
minus its deadline. The rate limit delays some on purpose; its share is
modelled exactly (tokend's own token bucket fed the deadlines in order), and
the lateness beyond it is what the target is about.

    python -m bench.deadlines [--size 10000] [--over 60] [--rate 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg

from bench import harness as h
from tokend.config import ProviderConfig
from tokend.dispatcher import RateLimit
from tokend.lifecycle import parse_iso

# Time for tokend to start, lead and load before the first deadline.
LEAD_S = 15.0


@dataclass
class Lateness:
    total: list[float]
    imposed: list[float]
    beyond: list[float]
    seconds: float


def lateness(pairs: list[tuple[float, float]], rate_per_s: float | None) -> Lateness:
    """From (deadline, start) pairs; `rate_per_s` None: no rate limit."""
    pairs = sorted(pairs)
    bucket = RateLimit()
    imposed = [
        d + (bucket.reserve("p", rate_per_s, d) if rate_per_s else 0.0)
        for d, _ in pairs
    ]
    starts = [s for _, s in pairs]
    return Lateness(
        [s - d for d, s in pairs],
        [i - d for (d, _), i in zip(pairs, imposed, strict=True)],
        [s - i for s, i in zip(starts, imposed, strict=True)],
        max(starts) - min(starts),
    )


def table_rows(label: str, found: Lateness) -> list[list[object]]:
    out: list[list[object]] = []
    for part, values in (
        ("lateness", found.total),
        ("rate limit's share", found.imposed),
        ("beyond the rate limit", found.beyond),
    ):
        p50, p99 = h.percentile(values, 50), h.percentile(values, 99)
        out.append([label, part, p50, p99, max(values)])
    return out


async def wait_count(
    conn: asyncpg.Connection, query: str, size: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await conn.fetchval(query) >= size:
            return
        await anyio.sleep(0.5)
    raise RuntimeError(f"not all {size} done within {timeout_s:.0f} s")


async def tokend_lateness(
    dsn: str, endpoint: h.Endpoint, size: int, over_s: float, rate: float
) -> Lateness:
    conn = await asyncpg.connect(dsn)
    try:
        seeded = await h.seed_due(
            conn, endpoint, size, due_from=time.time() + LEAD_S, due_over_s=over_s
        )
        with tempfile.TemporaryDirectory() as tmp:
            doc = h.config_doc(dsn, Path(tmp), providers={"rate_per_s": rate})
            config = h.write_toml(Path(tmp) / "tokend.toml", doc)
            daemon = h.Tokend(config, Path(tmp) / "tokend.log")
            try:
                await wait_count(
                    conn,
                    "SELECT count(*) FROM tokend_events",
                    size,
                    LEAD_S + over_s + size / rate + 120,
                )
            finally:
                daemon.stop()
        started = await started_at(conn)
    finally:
        await conn.close()
    return lateness([(due, started[(t, i)]) for t, i, due in seeded], rate)


async def started_at(
    conn: asyncpg.Connection,
) -> dict[tuple[uuid.UUID, uuid.UUID], float]:
    rows = await conn.fetch(
        """SELECT tenant, integration_id,
                  settings #>> '{tokenLifecycle,lastRefreshAttemptAt}'
           FROM rmm_integrations"""
    )
    found = {}
    for tenant, integration, text in rows:
        moment = parse_iso(text, "lastRefreshAttemptAt")
        assert moment is not None, "an integration was not refreshed"
        found[(tenant, integration)] = moment
    return found


async def main(size: int, over_s: float, rate: float) -> None:
    print(
        f"# deadline accuracy, {size} integrations due over {over_s:g} s,"
        f" rate limit {rate:g}/s; {h.machine()}"
    )
    with h.postgres() as pg:
        await h.prepare(pg.dsn())
        endpoint = h.Endpoint()
        try:
            found = await tokend_lateness(pg.dsn(), endpoint, size, over_s, rate)
        finally:
            endpoint.close()
    print()
    print(
        h.table(
            ["seconds", "p50", "p99", "max"],
            [row[1:] for row in table_rows("tokend", found)],
        )
    )
    beyond = h.percentile(found.beyond, 99)
    print(
        f"\n{size} refreshes in {found.seconds:.1f} s; p99 beyond the rate"
        f" limit {beyond:.3f} s (target < 1 s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="integrations")
    parser.add_argument("--over", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--rate",
        type=float,
        default=ProviderConfig().rate_per_s,
        help="the provider's rate limit, per second (default: tokend's)",
    )
    args = parser.parse_args()
    anyio.run(
        main, args.size, args.over, args.rate, backend_options={"use_uvloop": True}
    )
