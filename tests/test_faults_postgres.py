"""Postgres restarted or gone while tokend runs: tokend keeps running, says
it is not ready meanwhile, resumes, and a token set the provider rotated
while the database was away is stored once it is back, or spooled to the
journal at shutdown and stored at the next start."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread
import asyncpg
import pytest

from tests.conftest import PgServer
from tests.faults import fresh_database, own_postgres, said, spawn
from tests.helpers import Process, World, eventually
from tokend.embedded import free_port
from tokend.fake_endpoint import FakeTokenEndpoint, Fault
from tokend.secrets.postgres import postgres_store
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgServer]:
    with own_postgres() as server:
        yield server


@pytest.fixture
async def own_world(
    own_pg: PgServer, endpoint: FakeTokenEndpoint
) -> AsyncIterator[World]:
    endpoint.reuse_detection = True
    dsn = await fresh_database(own_pg)
    async with World.open(dsn, endpoint) as world:
        yield world
        # The connection made after a restart, if any (open() closes its own).
        await world.conn.close()


async def _reconnect(world: World) -> None:
    """A new connection for the test's own reads after a restart."""
    if not world.conn.is_closed():
        return
    world.conn = await asyncpg.connect(world.dsn)
    world.secrets = postgres_store(world.config().secrets, world.conn)


async def _stop(pg: PgServer) -> None:
    assert pg.embedded is not None
    await anyio.to_thread.run_sync(pg.embedded.stop)


async def _start(pg: PgServer) -> None:
    assert pg.embedded is not None
    await anyio.to_thread.run_sync(pg.embedded.start)


async def _ready(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=2)
        ) as response,
    ):
        return response.status


async def _all_current(world: World, keys: list[IntegrationKey]) -> None:
    await _reconnect(world)
    for key in keys:
        stored = (await world.credentials(key)).refresh_token
        assert world.endpoint.is_current(stored), key
        lifecycle = await world.lifecycle(key)
        assert lifecycle is not None and not lifecycle["reconnectRequired"]
    assert world.refreshes("reused") == []


async def test_postgres_restarted_while_tokend_runs(
    own_world: World, own_pg: PgServer, tmp_path: Path
) -> None:
    world = own_world
    port = free_port()
    a = spawn(
        tmp_path, world.dsn, "a", http={"enabled": True, "listen": f"127.0.0.1:{port}"}
    ).start()
    try:
        await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
        keys = [await world.connect() for _ in range(5)]
        await eventually(lambda: len(world.refreshes()) >= 5, timeout_s=20)
        assert await _ready(port) == 200

        await _stop(own_pg)
        await eventually(lambda: _not_ready(port), timeout_s=5)
        await anyio.sleep(2.0)
        assert a.proc is not None and a.proc.poll() is None, "tokend exited"
        assert await _ready(port) == 503
        await _start(own_pg)

        await eventually(lambda: len(said(a, "leadership gained")) >= 2, timeout_s=20)
        assert await _ready(port) == 200
        count = len(world.refreshes())
        await eventually(lambda: len(world.refreshes()) >= count + 10, timeout_s=20)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        await _all_current(world, keys)
    finally:
        a.stop()


async def _not_ready(port: int) -> bool:
    return await _ready(port) == 503


async def _rotated_while_down(
    world: World, pg: PgServer, a: Process
) -> tuple[IntegrationKey, str]:
    """A refresh whose answer arrives while Postgres is down: its rotated
    refresh token, which only tokend's memory and journal hold."""
    await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
    world.endpoint.faults.append(Fault(action="grant", delay_s=2.0))
    key = await world.connect()
    await eventually(lambda: world.endpoint.in_progress > 0, timeout_s=10)
    await _stop(pg)
    (rotation,) = await eventually(world.refreshes, timeout_s=10)
    await eventually(
        lambda: said(a, "journaled answers wait for the database"), timeout_s=10
    )
    assert rotation.new_refresh_token is not None
    return key, rotation.new_refresh_token


async def test_an_answer_that_arrives_while_postgres_is_down_is_stored_later(
    own_world: World, own_pg: PgServer, tmp_path: Path
) -> None:
    world = own_world
    a = spawn(tmp_path, world.dsn, "a").start()
    try:
        key, rotated = await _rotated_while_down(world, own_pg, a)
        await anyio.sleep(1.0)
        await _start(own_pg)
        await eventually(lambda: said(a, "journaled answer stored"), timeout_s=20)
        await _reconnect(world)
        assert (await world.credentials(key)).refresh_token == rotated
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        await _all_current(world, [key])
    finally:
        a.stop()


async def test_an_answer_unstored_at_shutdown_is_spooled_and_stored_at_start(
    own_world: World, own_pg: PgServer, tmp_path: Path
) -> None:
    world = own_world
    a = spawn(tmp_path, world.dsn, "a").start()
    try:
        key, rotated = await _rotated_while_down(world, own_pg, a)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        assert said(a, "provider answers not yet stored are spooled for the next start")
        spool = _state_bytes(tmp_path / "a-state")
        assert rotated.encode() not in spool and b"rt_" not in spool

        await _start(own_pg)
        a.start()
        await eventually(lambda: said(a, "journaled answer stored"), timeout_s=20)
        await _reconnect(world)
        assert (await world.credentials(key)).refresh_token == rotated
        await eventually(lambda: len(world.refreshes()) >= 2, timeout_s=20)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        await _all_current(world, [key])
    finally:
        a.stop()


def _state_bytes(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in state_dir.iterdir() if p.is_file())
