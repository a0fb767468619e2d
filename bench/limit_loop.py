"""The limit: the least a refresh can cost on this machine.

A bare asyncio loop (an asyncpg pool, one aiohttp session, no scheduling,
no logging, no events) refreshes every integration of the table once, at a
given concurrency: in one transaction, the integration's advisory lock,
read the row, read its credentials, POST the grant, write the rotated
credentials, write the lifecycle, commit. Seven statements, the pool's
reset disabled. Run by bench/throughput.py in a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import uvloop

from bench.harness import CLIENT_ID, CLIENT_SECRET, cipher
from tokend.credentials import Credentials
from tokend.keys import integration_key
from tokend.lifecycle import iso

READ_ROW = """SELECT provider, instance_url, settings -> 'tokenLifecycle'
              FROM rmm_integrations WHERE tenant = $1 AND integration_id = $2"""
READ_SECRET = """SELECT key_id, nonce, ciphertext FROM tokend_secrets
                 WHERE tenant = $1 AND name = 'ninjaone_credentials'"""
WRITE_SECRET = """UPDATE tokend_secrets
    SET key_id = $2, nonce = $3, ciphertext = $4, updated_at = now()
    WHERE tenant = $1 AND name = 'ninjaone_credentials'"""
WRITE_LIFECYCLE = """UPDATE rmm_integrations
    SET settings = jsonb_set(settings, '{tokenLifecycle}', $3::jsonb),
        updated_at = now()
    WHERE tenant = $1 AND integration_id = $2"""
NAME = "ninjaone_credentials"


async def _noop_reset(conn: Any) -> None:
    return None


class MinimalRefresh:
    """One refresh, as plainly as it can be done (also procrastinate's job)."""

    def __init__(self, pool: asyncpg.Pool, session: aiohttp.ClientSession) -> None:
        self.pool = pool
        self.session = session
        self.seal = cipher()

    @classmethod
    async def open(cls, dsn: str, size: int) -> MinimalRefresh:
        pool = await asyncpg.create_pool(
            dsn, min_size=size, max_size=size, reset=_noop_reset
        )
        assert pool is not None
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return cls(pool, session)

    async def close(self) -> None:
        await self.session.close()
        await self.pool.close()

    async def __call__(self, tenant: Any, integration: Any) -> None:
        started = time.time()
        async with self.pool.acquire() as conn, conn.transaction():
            lock = integration_key(tenant, integration)
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            row = await conn.fetchrow(READ_ROW, tenant, integration)
            sealed = await conn.fetchrow(READ_SECRET, tenant)
            assert row is not None and sealed is not None
            old = Credentials.parse(self.seal.decrypt(tenant, NAME, *sealed))
            form = {
                "grant_type": "refresh_token",
                "refresh_token": old.refresh_token,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
            url = f"{row[1]}/oauth/token"
            async with self.session.post(url, data=form) as response:
                answer = orjson.loads(await response.read())
            assert response.status == 200, answer
            new = Credentials(
                answer["access_token"],
                answer["refresh_token"],
                int((time.time() + answer["expires_in"]) * 1000),
                old.instance_url,
                old.extra,
            )
            sealed_new = self.seal.encrypt(tenant, NAME, new.dumps())
            await conn.execute(WRITE_SECRET, tenant, *sealed_new)
            lifecycle = orjson.loads(row[2])
            lifecycle["lastRefreshAttemptAt"] = iso(started)
            doc = orjson.dumps(lifecycle).decode()
            await conn.execute(WRITE_LIFECYCLE, tenant, integration, doc)


async def main(dsn: str, concurrency: int) -> None:
    refresh = await MinimalRefresh.open(dsn, concurrency)
    keys = await refresh.pool.fetch(
        "SELECT tenant, integration_id FROM rmm_integrations"
    )
    pending = iter(keys)

    async def worker() -> None:
        for tenant, integration in pending:
            await refresh(tenant, integration)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await refresh.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    uvloop.install()
    asyncio.run(main(args.dsn, args.concurrency))
