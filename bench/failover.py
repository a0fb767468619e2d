"""Failover: from SIGKILL of the leader to the first refresh by the new one.

Two `tokend run` processes (defaults) share a database with N integrations
whose deadlines are an hour away. Each trial writes one more integration
due at once straight into the table, without a notification (so the
leader, who learns of it only at its next resync, does not refresh it),
kills the leader with SIGKILL, and times the first refresh the fake
endpoint then sees: the follower must take the lock, LISTEN, load all N+1
and refresh. The killed process is started again as the next follower.

    python -m bench.failover [--size 10000] [--trials 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio
import asyncpg
import orjson

from bench import harness as h
from tokend.credentials import Credentials
from tokend.lifecycle import iso

WAITING = """
SELECT count(*) FROM pg_stat_activity
WHERE application_name = 'tokend-leader' AND wait_event_type = 'Lock'"""


def _leads(daemon: h.Tokend, times: int) -> bool:
    lines = daemon.log_lines()
    gained = [e for e in lines if e.get("message") == "leadership gained"]
    loaded = [e for e in lines if e.get("message") == "integrations loaded"]
    return len(gained) >= times and len(loaded) >= times


async def _canary(conn: asyncpg.Connection, endpoint: h.Endpoint) -> str:
    """One integration due now, unknown to the running leader."""
    (grant,) = await endpoint.grants(1)
    tenant, integration = await conn.fetchrow(
        "SELECT gen_random_uuid(), gen_random_uuid()"
    )
    seal = h.cipher()
    creds = Credentials(
        grant["access_token"],
        grant["refresh_token"],
        int((time.time() + 3600) * 1000),
        endpoint.url,
        {},
    ).dumps()
    name = "ninjaone_credentials"
    await conn.execute(
        "INSERT INTO tokend_secrets (tenant, name, key_id, nonce, ciphertext)"
        " VALUES ($1, $2, $3, $4, $5)",
        tenant,
        name,
        *seal.encrypt(tenant, name, creds),
    )
    lifecycle = {
        "status": "scheduled",
        "scheduleNonce": 1,
        "expiresAt": iso(time.time() + 3600),
        "nextRefreshAt": iso(time.time() - 1),
    }
    await conn.execute(
        "INSERT INTO rmm_integrations (tenant, integration_id, provider,"
        " instance_url, settings) VALUES ($1, $2, 'ninjaone', $3, $4::jsonb)",
        tenant,
        integration,
        endpoint.url,
        orjson.dumps({"tokenLifecycle": lifecycle}).decode(),
    )
    return str(grant["refresh_token"])


async def _refreshed_at(endpoint: h.Endpoint, token: str) -> float | None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{endpoint.url}/_admin/log") as response,
    ):
        log = await response.json()
    for entry in log:
        if entry["refresh_token"] == token and entry["result"] == "ok":
            return float(entry["at"])
    return None


async def main(size: int, trials: int) -> None:
    print(f"# failover, {size} integrations, {trials} trials; {h.machine()}")
    takeovers: list[float] = []
    with h.postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.dsn()
        await h.prepare(dsn)
        endpoint = h.Endpoint()
        conn = await asyncpg.connect(dsn)
        config = h.write_toml(Path(tmp) / "tokend.toml", h.config_doc(dsn, Path(tmp)))
        daemons: list[h.Tokend] = []
        try:
            await h.seed_due(conn, endpoint, size, due_from=time.time() + 3600)
            starts = [0, 0]

            def start(i: int) -> h.Tokend:
                starts[i] += 1
                return h.Tokend(config, Path(tmp) / f"tokend-{i}-{starts[i]}.log")

            daemons = [start(0)]
            await h.wait_for(lambda: _leads(daemons[0], 1), 120, 0.05)
            daemons.append(start(1))
            leader = 0
            for _ in range(trials):
                # The follower must be waiting for the lock before the kill.
                await h.wait_for_async(lambda: _count(conn, WAITING), 60, 0.05)
                token = await _canary(conn, endpoint)
                killed = time.time()
                daemons[leader].kill()
                follower = 1 - leader
                refreshed = None
                deadline = time.monotonic() + 60
                while refreshed is None and time.monotonic() < deadline:
                    refreshed = await _refreshed_at(endpoint, token)
                    await anyio.sleep(0.02)
                if refreshed is None:
                    raise RuntimeError("no refresh by the new leader within 60 s")
                takeovers.append(refreshed - killed)
                daemons[leader] = start(leader)
                leader = follower
        finally:
            for daemon in daemons:
                daemon.stop()
            await conn.close()
            endpoint.close()
    print()
    print(
        h.table(
            ["trials", "p50 s", "max s", "min s"],
            [[len(takeovers), h.median(takeovers), max(takeovers), min(takeovers)]],
        )
    )
    print(
        f"\neach: {' '.join(f'{t:.3f}' for t in takeovers)}"
        f"\nmax {max(takeovers):.3f} s (target < 1 s)"
    )


async def _count(conn: asyncpg.Connection, query: str) -> bool:
    return bool(await conn.fetchval(query))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="integrations")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    anyio.run(main, args.size, args.trials, backend_options={"use_uvloop": True})
