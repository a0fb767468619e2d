"""The refresh pool without asyncpg's reset: tokend leaves nothing behind on
a pooled connection; the locked transaction and the merged lifecycle-and-
events statement do what the separate statements did."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack

import asyncpg
import orjson
import pytest

from tests.helpers import World, eventually, running
from tokend.db import LockedTransaction, create_pool
from tokend.lifecycle import Lifecycle
from tokend.store import Event, IntegrationKey, Store

pytestmark = pytest.mark.anyio

SESSION_STATE = """
SELECT (SELECT count(*) FROM pg_locks
        WHERE pid = pg_backend_pid() AND locktype = 'advisory') AS advisory,
       (SELECT count(*) FROM pg_listening_channels()) AS listening,
       (SELECT count(*) FROM pg_cursors) AS cursors,
       (SELECT string_agg(name || '=' || setting, ',' ORDER BY name)
        FROM pg_settings) AS settings,
       (SELECT count(*) FROM pg_prepared_xacts) AS prepared
"""


async def test_pooled_connections_keep_no_session_state(world: World) -> None:
    config = world.config(database={"pool_size": 3})
    async with running(config) as daemon:
        refreshed = await world.connect()
        await eventually(lambda: world.refreshes())
        for event in ("refresh_now", "disconnected", "connected", "reset"):
            await world.notify(event, refreshed)
        await world.connect(notify=False)
        await daemon.resync()
        await eventually(lambda: len(world.refreshes()) >= 2)
        assert daemon.refresher is not None
        pool = daemon.refresher.pool
        fresh = await asyncpg.connect(
            world.dsn, server_settings=dict(pool._connect_kwargs["server_settings"])
        )
        try:
            baseline = dict(await fresh.fetchrow(SESSION_STATE) or {})
        finally:
            await fresh.close()
        async with AsyncExitStack() as stack:
            conns = [
                await stack.enter_async_context(pool.acquire())
                for _ in range(pool.get_size())
            ]
            assert len(conns) == 3
            for conn in conns:
                assert not conn.is_in_transaction()
                assert dict(await conn.fetchrow(SESSION_STATE) or {}) == baseline
        assert baseline["advisory"] == 0 and baseline["listening"] == 0


async def test_a_locked_transaction_holds_the_lock_until_it_ends(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    probe = "SELECT pg_try_advisory_xact_lock($1)"
    try:
        async with LockedTransaction(conn, 42):
            assert conn.is_in_transaction()
            async with other.transaction():
                assert await other.fetchval(probe, 42) is False
        assert not conn.is_in_transaction()
        assert await other.fetchval(probe, 42) is True

        with pytest.raises(ZeroDivisionError):
            async with LockedTransaction(conn, 42):
                await conn.execute("CREATE TABLE gone_with_rollback (x int)")
                raise ZeroDivisionError
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('gone_with_rollback')") is None
        assert await other.fetchval(probe, 42) is True
    finally:
        await conn.close()
        await other.close()


async def test_a_lock_wait_that_fails_leaves_no_open_transaction(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"lock_timeout": "100ms"})
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(7)")
            with pytest.raises(asyncpg.LockNotAvailableError):
                await LockedTransaction(conn, 7).start()
            assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
        await holder.close()


async def test_a_lifecycle_and_its_events_are_written_in_one_statement(
    world: World,
) -> None:
    key = await world.connect(notify=False)
    store = Store("rmm_integrations", "tokend_events")
    heard: list[str] = []
    listener = await asyncpg.connect(world.dsn)
    await listener.add_listener(
        "tokend_events", lambda *args: heard.append(str(args[-1]))
    )
    pool = await create_pool(world.config())
    try:
        events = [
            Event("INTEGRATION_TOKEN_REFRESHED", key, "ninjaone", 1.0),
            Event("INTEGRATION_TOKEN_RECOVERED", key, "ninjaone", 1.0),
        ]
        async with pool.acquire() as conn, store.locked(conn, key):
            written = await store.write_lifecycle(
                conn, key, Lifecycle(schedule_nonce=7), events
            )
        assert written
        lifecycle = await world.lifecycle(key)
        assert lifecycle is not None and lifecycle["scheduleNonce"] == 7
        stored = [e["type"] for e in await world.events(key)]
        assert stored == [e.type for e in events]
        await eventually(lambda: len(heard) == 2)
        assert [orjson.loads(p)["type"] for p in heard] == stored

        missing = IntegrationKey(uuid.uuid4(), uuid.uuid4())
        async with pool.acquire() as conn:
            written = await store.write_lifecycle(
                conn, missing, Lifecycle(), [Event("X", missing, "ninjaone")]
            )
        assert not written
        assert await world.events(missing) == []
    finally:
        await pool.close()
        await listener.close()
