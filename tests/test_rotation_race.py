"""The host app refreshes too: invalid_grant after someone else rotated the
refresh token is no dead integration, and the documented lock keeps the two
refreshes apart."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg
import pytest

from tests.helpers import CLIENT_ID, World, eventually, running
from tests.refreshing import refresh_now, refresher, refreshes_counted
from tokend.credentials import Credentials
from tokend.fake_endpoint import Fault
from tokend.secrets.postgres import PostgresSecretStore, postgres_store
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio

RECONNECT = "INTEGRATION_RECONNECT_REQUIRED"


@asynccontextmanager
async def host_app(
    world: World,
) -> AsyncIterator[tuple[asyncpg.Connection, PostgresSecretStore]]:
    """The host app's own connection and its view of the secrets."""
    conn = await asyncpg.connect(world.dsn)
    try:
        yield conn, postgres_store(world.config().secrets, conn)
    finally:
        await conn.close()


class LazyHost:
    """The host app refreshing lazily, without tokend's lock, with the very
    refresh token tokend is sending. `before` is the fake endpoint's hook:
    it runs when tokend's request arrives, ahead of serving it."""

    def __init__(self, world: World, key: IntegrationKey, *, defer: bool) -> None:
        self.world = world
        self.key = key
        # Deferred: the host app stores its new set only when told to, after
        # tokend's request has been refused.
        self.defer = defer
        self.rotated: Credentials | None = None
        self.stored: Credentials | None = None

    async def before(self, refresh_token: str) -> None:
        status, answer = self.world.endpoint.rotate(refresh_token, CLIENT_ID)
        assert status == 200, answer
        self.rotated = Credentials(
            answer["access_token"],
            answer["refresh_token"],
            int((time.time() + answer["expires_in"]) * 1000),
            self.world.endpoint.url,
            {},
        )
        if not self.defer:
            await self.store()

    async def store(self) -> None:
        assert self.rotated is not None
        async with host_app(self.world) as (conn, secrets):
            await secrets.put(
                self.key.tenant, "ninjaone_credentials", self.rotated.dumps()
            )
            await conn.execute(
                "SELECT tokend_notify('refreshed', $1, $2)",
                self.key.tenant,
                self.key.integration_id,
            )
        self.stored = self.rotated


async def test_host_refresh_between_read_and_request_is_no_reconnect(
    world: World,
) -> None:
    config = world.config(scheduler={"buffer_s": 3597.0})
    async with running(config) as daemon:
        key = await world.connect(notify=False)
        host = LazyHost(world, key, defer=False)
        world.endpoint.faults.append(Fault(action="grant", before=host.before))
        await world.notify("connected", key)

        await eventually(lambda: host.stored)

        async def rescheduled() -> dict | None:  # type: ignore[type-arg]
            doc = await world.lifecycle(key)
            ok = doc and doc["lastScheduleSource"] == "lazy_refresh_success"
            return doc if ok else None

        lifecycle = await eventually(rescheduled)
        assert daemon.schedule.get(key) is not None

    # tokend's own request came second and was refused as a reuse...
    assert [e.result for e in world.endpoint.log] == ["ok", "reused"]
    # ...yet the integration stays healthy on the host app's new tokens.
    assert lifecycle["status"] == "scheduled"
    assert lifecycle["reconnectRequired"] is False
    assert lifecycle["consecutiveFailures"] == 0
    current = await world.credentials(key)
    assert host.stored is not None
    assert current.refresh_token == host.stored.refresh_token
    assert world.endpoint.refresh_token_valid(current.refresh_token)
    assert RECONNECT not in [e["type"] for e in await world.events(key)]


@pytest.mark.parametrize("recheck_s", [2.0, 0.0])
async def test_host_store_landing_after_the_refusal(
    world: World, recheck_s: float
) -> None:
    """The host app stores its rotated set a moment after tokend's request
    was refused: tokend looks again before declaring reconnect-required
    (with the recheck off, the window shows)."""
    key = await world.connect(notify=False)
    host = LazyHost(world, key, defer=True)
    world.endpoint.faults.append(Fault(action="grant", before=host.before))
    config = world.config(
        retry={"rotation_recheck_s": recheck_s}, database={"pool_size": 2}
    )
    counted = refreshes_counted("ninjaone", "rotated_elsewhere")
    async with refresher(config) as r, anyio.create_task_group() as tg:

        async def host_app_store() -> None:
            # Once tokend has its refusal, give it a moment to look, then store.
            await eventually(lambda: world.refreshes("reused"))
            await anyio.sleep(0.3)
            await host.store()

        tg.start_soon(host_app_store)
        outcome = await refresh_now(r, key)

    lifecycle = await world.lifecycle(key)
    assert lifecycle is not None
    types = [e["type"] for e in await world.events(key)]
    if recheck_s:
        assert outcome == "rotated_elsewhere"
        assert refreshes_counted("ninjaone", "rotated_elsewhere") == counted + 1
        assert lifecycle["status"] == "scheduled"
        assert RECONNECT not in types
    else:
        assert outcome == "reconnect_required"
        assert types == [RECONNECT]
    assert host.stored is not None
    assert (await world.credentials(key)).refresh_token == host.stored.refresh_token


async def test_the_documented_lock_makes_the_two_refreshes_take_turns(
    world: World,
) -> None:
    """A host app that takes tokend_integration_lock_key's lock: tokend's due
    refresh waits for it, then finds the new tokens and only reschedules."""
    key = await world.connect(notify=False)
    config = world.config(database={"pool_size": 2})
    async with host_app(world) as (conn, secrets), refresher(config) as r:
        await r.reschedule(key, "oauth_connected", immediate=True)
        due = r.schedule.pop_due(time.time() + 1)
        assert due is not None
        async with anyio.create_task_group() as tg, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(tokend_integration_lock_key($1, $2))",
                key.tenant,
                key.integration_id,
            )
            outcome: list[str] = []

            async def tokend_refresh() -> None:
                outcome.append(await r.refresh(due))

            tg.start_soon(tokend_refresh)
            await anyio.sleep(0.5)
            assert outcome == [], "tokend did not wait for the host's lock"
            sent = await world.credentials(key)
            status, answer = world.endpoint.rotate(sent.refresh_token, CLIENT_ID)
            assert status == 200
            fresh = Credentials(
                answer["access_token"],
                answer["refresh_token"],
                int((time.time() + 7200) * 1000),
                sent.instance_url,
                {},
            )
            await secrets.put(key.tenant, "ninjaone_credentials", fresh.dumps())
    assert outcome == ["skipped"]
    assert [e.result for e in world.endpoint.log] == ["ok"]
    lifecycle = await world.lifecycle(key)
    assert lifecycle is not None and lifecycle["status"] == "scheduled"
    assert lifecycle["lastScheduleSource"] == "resync"
    assert (await world.credentials(key)).refresh_token == fresh.refresh_token
