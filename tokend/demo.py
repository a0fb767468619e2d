"""`tokend demo`: the main job end to end with nothing installed but tokend.

It starts an embedded Postgres and the fake NinjaOne token endpoint, seeds
integrations whose tokens live a short while (half before the daemon
starts, so the start-up load backfills them; half after, announced with
`connected` notifications), runs the daemon and prints every event it
emits. At the end it checks each stored token set against the endpoint.
"""

from __future__ import annotations

import base64
import os
import random
import secrets
import sys
import time
import uuid
from collections import Counter
from typing import Any

import anyio
import asyncpg
import orjson

from tokend.config import Config, parse
from tokend.credentials import Credentials
from tokend.daemon import Daemon
from tokend.embedded import EmbeddedPostgres
from tokend.fake_endpoint import FakeTokenEndpoint
from tokend.logs import configure_logging
from tokend.migrate import migrate
from tokend.secrets import APP
from tokend.secrets.postgres import postgres_store

CLIENT_ID = "tokend-demo"


def demo_config(dsn: str, token_lifetime_s: float, state_dir: str) -> Config:
    """Refresh at two thirds of the token's life, spread over a tenth of it."""
    doc: dict[str, Any] = {
        "database": {"dsn": dsn, "pool_size": 10},
        "scheduler": {
            "buffer_s": token_lifetime_s / 3,
            "min_delay_s": 1.0,
            "spread_s": token_lifetime_s / 10,
            "resync_interval_s": 60.0,
        },
        "retry": {"initial_s": 1.0, "max_s": token_lifetime_s / 6},
        "http": {"enabled": False},
        "secrets": {"key": base64.b64encode(os.urandom(32)).decode()},
        "daemon": {"state_dir": state_dir},
        "providers": {"ninjaone": {"allow_http_loopback": True}},
    }
    return parse(doc, {}, "demo")


def run(
    *,
    integrations: int,
    token_lifetime_s: float,
    duration_s: float | None,
    as_json: bool,
) -> int:
    configure_logging("warning", "text")
    with EmbeddedPostgres() as pg:
        summary = anyio.run(
            _demo,
            pg,
            integrations,
            token_lifetime_s,
            duration_s,
            as_json,
            backend_options={"use_uvloop": True},
        )
    if as_json:
        print(orjson.dumps(summary).decode())
    else:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


async def _demo(
    pg: EmbeddedPostgres,
    count: int,
    lifetime_s: float,
    duration_s: float | None,
    as_json: bool,
) -> dict[str, Any]:
    endpoint = FakeTokenEndpoint(
        {CLIENT_ID: secrets.token_urlsafe(16)}, expires_in_s=int(lifetime_s)
    )
    url = await endpoint.start()
    config = demo_config(pg.dsn(), lifetime_s, str(pg.base / "state"))
    conn = await asyncpg.connect(pg.dsn())
    await migrate(conn, host_table=True)
    daemon = Daemon(config)
    seeder = _Seeder(conn, endpoint, config, url, lifetime_s)
    events: Counter[str] = Counter()
    started = time.monotonic()

    def on_event(_: object, __: int, ___: str, payload: object) -> None:
        event = orjson.loads(str(payload))
        events[event["type"]] += 1
        if not as_json:
            _print_event(event, time.monotonic() - started)

    await conn.add_listener(config.notify.events_channel, on_event)
    try:
        await seeder.seed(count // 2 + count % 2, notify=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await anyio.sleep(1.0)
            await seeder.seed(count // 2, notify=True)
            if not as_json:
                print(f"{count} integrations connected; refreshing. Ctrl-C to stop.")
            with anyio.move_on_after(duration_s if duration_s else float("inf")):
                await anyio.sleep_forever()
            daemon.stop()
        return await _summary(conn, endpoint, config, count, events)
    finally:
        await conn.close()
        await endpoint.stop()


class _Seeder:
    def __init__(
        self,
        conn: asyncpg.Connection,
        endpoint: FakeTokenEndpoint,
        config: Config,
        url: str,
        lifetime_s: float,
    ) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.config = config
        self.url = url
        self.lifetime_s = lifetime_s
        self.rng = random.Random()

    async def seed(self, count: int, *, notify: bool) -> None:
        store = postgres_store(self.config.secrets, self.conn)
        client_secret = self.endpoint.clients[CLIENT_ID]
        await store.put(APP, "ninjaone_client_id", CLIENT_ID.encode())
        await store.put(APP, "ninjaone_client_secret", client_secret.encode())
        for _ in range(count):
            tenant, integration = uuid.uuid4(), uuid.uuid4()
            grant = self.endpoint.grant(CLIENT_ID)
            # Stagger the first expiries so refreshes spread over the lifetime.
            lives = self.rng.uniform(self.lifetime_s / 2, self.lifetime_s)
            credentials = Credentials(
                grant["access_token"],
                grant["refresh_token"],
                int((time.time() + lives) * 1000),
                self.url,
                {},
            )
            await store.put(tenant, "ninjaone_credentials", credentials.dumps())
            await self.conn.execute(
                "INSERT INTO rmm_integrations (tenant, integration_id, provider,"
                " instance_url) VALUES ($1, $2, 'ninjaone', $3)",
                tenant,
                integration,
                self.url,
            )
            if notify:
                await self.conn.execute(
                    "SELECT tokend_notify('connected', $1, $2)", tenant, integration
                )


def _print_event(event: dict[str, Any], elapsed: float) -> None:
    kind = event["type"].removeprefix("INTEGRATION_").lower()
    detail = f"expires {event['expires_at']}" if event["expires_at"] else ""
    if event["error_code"]:
        detail = f"{event['error_code']}: {event['error_message']}"
    print(
        f"{elapsed:7.1f}s  {kind:<22} tenant {event['tenant'][:8]}  {detail}",
        flush=True,
    )
    sys.stdout.flush()


async def _summary(
    conn: asyncpg.Connection,
    endpoint: FakeTokenEndpoint,
    config: Config,
    count: int,
    events: Counter[str],
) -> dict[str, Any]:
    store = postgres_store(config.secrets, conn)
    rows = await conn.fetch(
        "SELECT tenant, settings #>> '{tokenLifecycle,status}' AS status"
        " FROM rmm_integrations WHERE is_active"
    )
    now_ms = time.time() * 1000
    expired = lost = 0
    for row in rows:
        raw = await store.get(row["tenant"], "ninjaone_credentials")
        assert raw is not None
        stored = Credentials.parse(raw)
        expired += stored.expires_at_ms < now_ms
        lost += not endpoint.refresh_token_valid(stored.refresh_token)
    statuses = Counter(row["status"] for row in rows)
    return {
        "integrations": count,
        "refreshed": events["INTEGRATION_TOKEN_REFRESHED"],
        "failed": events["INTEGRATION_TOKEN_REFRESH_FAILED"],
        "reconnect_required": statuses["reconnect_required"],
        "expired_unrefreshed": expired,
        "refresh_tokens_rejected": lost,
        "statuses": dict(statuses),
    }
