"""A network partition between the leader and Postgres: a proxy that stops
forwarding without closing. The leader notices within its heartbeat
timeout and stops refreshing; the server, through the keepalive and
tcp_user_timeout settings of the lock connection, frees the lock within a
bound; the follower takes over only after that."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import anyio
import asyncpg
import orjson
import pytest

from tests.faults import TcpProxy, at, backends, lock_holder, said, spawn
from tests.helpers import World, eventually

pytestmark = pytest.mark.anyio

LEADER = {
    "lock_timeout_s": 1.0,
    "heartbeat_interval_s": 1.0,
    "heartbeat_timeout_s": 0.8,
    "lease_s": 3.0,
    "keepalive_idle_s": 1,
    "keepalive_interval_s": 1,
    "keepalive_count": 2,
    "tcp_user_timeout_s": 2,
}
# Step down by the end of the heartbeat that fails to answer in time.
NOTICE_BOUND_S = LEADER["heartbeat_interval_s"] + LEADER["heartbeat_timeout_s"]


async def _host_app_notifies(world: World) -> None:
    """What a host app keeps sending: every notification is data the server
    must deliver to the partitioned leader, which its tcp_user_timeout bounds."""
    pad = "x" * 2000
    conn = await asyncpg.connect(world.dsn)
    try:
        while True:
            payload = {
                "event": "refreshed",
                "tenant": str(uuid.uuid4()),
                "integration_id": str(uuid.uuid4()),
                "pad": pad,
            }
            await conn.execute(
                "SELECT pg_notify('tokend', $1)", orjson.dumps(payload).decode()
            )
            await anyio.sleep(0.1)
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def test_a_partitioned_leader_stops_and_the_follower_waits_for_the_server(
    world: World, tmp_path: Path
) -> None:
    # A rotation grace: the partition may strand a request in flight on the
    # old leader, whose answer cannot reach the database while it lasts.
    world.endpoint.reuse_detection = True
    world.endpoint.rotation_grace_s = 60.0
    with TcpProxy(int(world.dsn.split(":")[-1].split("/")[0])) as proxy:
        a = spawn(tmp_path, proxy.url(world.dsn), "a", leader=LEADER).start()
        b = spawn(tmp_path, world.dsn, "b", leader=LEADER)
        try:
            await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
            a_pid = await lock_holder(world.conn)
            b.start()

            async def both() -> bool:
                return len(await backends(world.conn, "tokend-leader")) == 2

            await eventually(both, timeout_s=20)
            keys = [await world.connect() for _ in range(5)]
            await eventually(lambda: len(world.refreshes()) >= 5, timeout_s=20)

            partitioned_at = time.time()
            proxy.stall()
            released_at = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(_host_app_notifies, world)
                stepped = await eventually(
                    lambda: said(a, "stepping down"), timeout_s=10
                )
                # The last moment the server was seen to hold a's lock (a
                # query's send time: it ran no earlier than that).
                held_at = time.time()
                while True:
                    asked = time.time()
                    if await lock_holder(world.conn) != a_pid:
                        break
                    held_at = asked
                    await anyio.sleep(0.05)
                released_at = time.time()
                await eventually(lambda: said(b, "leadership gained"), timeout_s=10)
                tg.cancel_scope.cancel()

            noticed_s = at(stepped[0]) - partitioned_at
            released_s = released_at - partitioned_at
            taken_at = at(said(b, "leadership gained")[0])
            print(
                f"partition: leader stepped down after {noticed_s:.2f} s,"
                f" server freed the lock after {released_s:.2f} s,"
                f" follower led {taken_at - partitioned_at:.2f} s after the cut"
            )
            assert noticed_s < NOTICE_BOUND_S + 0.5
            # Keepalive bound of the settings above: 1 + 1 x 2 s, or the
            # tcp_user_timeout of 2 s once data is pending, plus the time to
            # fill the proxy's small buffers.
            assert released_s < 15
            # Never two leaders: b led only after the server let a's lock go
            # (log times are to the millisecond).
            assert taken_at >= held_at - 0.001
            # The old leader started nothing once it had stepped down.
            started = [at(x) for x in said(a, "refresh started")]
            assert all(t <= at(stepped[0]) for t in started)

            proxy.heal()
            count = len(world.refreshes())
            await eventually(lambda: len(world.refreshes()) >= count + 10, timeout_s=30)
            assert len(said(b, "leadership gained")) == 1
            for process in (a, b):
                process.signal(signal.SIGTERM)
                assert process.wait(30) == 0
            for key in keys:
                stored = (await world.credentials(key)).refresh_token
                assert world.endpoint.is_current(stored), key
        finally:
            a.stop()
            b.stop()
