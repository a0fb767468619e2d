"""Reliability figures for docs/reliability.md, measured with the default
leader settings (the tests use shorter ones to stay fast).

    python -m bench.reliability takeover   # SIGKILL the leader, time the follower
    python -m bench.reliability window     # provider answer in hand -> durable
    python -m bench.reliability partition  # stall the leader's link to Postgres

Each prints one JSON object. Everything runs on loopback: an embedded
Postgres, the fake token endpoint, `tokend run` processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson

from tests.conftest import PgServer
from tests.faults import (
    TcpProxy,
    at,
    fresh_database,
    lock_holder,
    own_postgres,
    said,
    spawn,
)
from tests.helpers import World, eventually, running
from tokend.config import LeaderConfig
from tokend.fake_endpoint import FakeTokenEndpoint

CLIENT = {"test-client": "test-client-secret-s3cr3t"}
# The defaults, spelled out: what docs/reliability.md states bounds for.
DEFAULT_LEADER = {
    name: getattr(LeaderConfig(), name)
    for name in (
        "lock_timeout_s",
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "lease_s",
        "keepalive_idle_s",
        "keepalive_interval_s",
        "keepalive_count",
        "tcp_user_timeout_s",
    )
}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": round(statistics.median(ordered), 4),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 4),
        "max": round(ordered[-1], 4),
    }


@contextmanager
def _tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tokend-bench-") as name:
        yield Path(name)


async def _world(pg: PgServer) -> tuple[World, Any, FakeTokenEndpoint]:
    endpoint = FakeTokenEndpoint(CLIENT, reuse_detection=True)
    await endpoint.start()
    opened = World.open(await fresh_database(pg), endpoint)
    world = await opened.__aenter__()
    return world, opened, endpoint


async def takeover(pg: PgServer, rounds: int) -> dict[str, Any]:
    world, opened, endpoint = await _world(pg)
    with _tmp() as tmp:
        procs = [spawn(tmp, world.dsn, name, leader=DEFAULT_LEADER) for name in "ab"]
        procs[0].start()
        await eventually(lambda: said(procs[0], "leadership gained"), timeout_s=30)
        procs[1].start()
        await anyio.sleep(3)
        seconds = []
        leader, other = procs
        try:
            for _ in range(rounds):
                before = len(said(other, "leadership gained"))
                killed = time.time()
                leader.kill()
                gained = await eventually(
                    lambda o=other, n=before: said(o, "leadership gained")[n:],
                    timeout_s=30,
                    every_s=0.01,
                )
                seconds.append(at(gained[0]) - killed)
                leader.start()
                await anyio.sleep(2)
                leader, other = other, leader
        finally:
            for process in procs:
                process.stop()
    await opened.__aexit__(None, None, None)
    await endpoint.stop()
    return {"takeover_after_sigkill_s": _spread(seconds)}


class _Windows(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        value = record.__dict__.get("journal_ms")
        if record.getMessage() == "refresh succeeded" and value is not None:
            self.ms.append(float(value))


async def window(pg: PgServer, integrations: int, seconds: float) -> dict[str, Any]:
    world, opened, endpoint = await _world(pg)
    windows = _Windows()
    logging.getLogger("tokend.refresher").addHandler(windows)
    logging.getLogger("tokend.refresher").setLevel(logging.INFO)
    config = world.config(
        scheduler={"buffer_s": 3598.0, "min_delay_s": 0.5, "spread_s": 1.0}
    )
    async with running(config):
        for _ in range(integrations):
            await world.connect()
        await anyio.sleep(seconds)
    await opened.__aexit__(None, None, None)
    await endpoint.stop()
    return {"answer_to_durable_ms": _spread(windows.ms)}


async def partition(pg: PgServer) -> dict[str, Any]:
    world, opened, endpoint = await _world(pg)
    port = int(world.dsn.rsplit(":", 1)[1].split("/")[0])
    with _tmp() as tmp, TcpProxy(port) as proxy:
        a = spawn(tmp, proxy.url(world.dsn), "a", leader=DEFAULT_LEADER).start()
        b = spawn(tmp, world.dsn, "b", leader=DEFAULT_LEADER)
        try:
            await eventually(lambda: said(a, "leadership gained"), timeout_s=30)
            holder = await lock_holder(world.conn)
            b.start()
            await anyio.sleep(3)
            stalled = time.time()
            proxy.stall()
            notifier = await asyncpg.connect(world.dsn)
            payload = orjson.dumps(
                {"event": "resync", "pad": "x" * 2000, "id": str(uuid.uuid4())}
            ).decode()
            while await lock_holder(world.conn) == holder:
                # A host app's notifications: data the server must deliver.
                await notifier.execute("SELECT pg_notify('tokend', $1)", payload)
                await anyio.sleep(0.1)
            released = time.time()
            await notifier.close()
            gained = await eventually(
                lambda: said(b, "leadership gained"), timeout_s=30
            )
            stepped = said(a, "stepping down")
            return {
                "leader_stepped_down_after_s": round(at(stepped[0]) - stalled, 3)
                if stepped
                else None,
                "server_freed_lock_after_s": round(released - stalled, 3),
                "follower_led_after_s": round(at(gained[0]) - stalled, 3),
                "settings": DEFAULT_LEADER,
            }
        finally:
            a.stop()
            b.stop()
            await opened.__aexit__(None, None, None)
            await endpoint.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["takeover", "window", "partition"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--integrations", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with own_postgres() as pg:
        if args.what == "takeover":
            result = asyncio.run(takeover(pg, args.rounds))
        elif args.what == "window":
            result = asyncio.run(window(pg, args.integrations, args.seconds))
        else:
            result = asyncio.run(partition(pg))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
