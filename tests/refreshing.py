"""Driving single refreshes without a daemon: a Refresher on a real pool and a
real HTTP session, so a test decides exactly when each refresh runs."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import generate_latest

from tokend import oauth
from tokend.config import Config
from tokend.db import create_pool
from tokend.journal import Journal, journal_cipher
from tokend.metrics import REGISTRY
from tokend.refresher import Refresher
from tokend.safekeeping import Safekeeping
from tokend.schedule import Schedule
from tokend.secrets import open_store
from tokend.store import IntegrationKey, Store


class FailingResolver(AbstractResolver):
    """A resolver that knows no name: DNS failure without asking any server."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        raise OSError(socket.EAI_NONAME, f"Name or service not known: {host}")

    async def close(self) -> None:
        return None


@asynccontextmanager
async def refresher(
    config: Config, *, resolver: AbstractResolver | None = None, seed: int = 7
) -> AsyncIterator[Refresher]:
    """A Refresher as the daemon builds it; the resolver replaces DNS."""
    pool = await create_pool(config)
    marks = await create_pool(config, max_size=2, name="tokend-marks")
    journal = Journal(config.daemon.state_dir, journal_cipher(config))
    journal.open()
    store = Store(config.database.integrations_table, config.notify.events_channel)
    try:
        async with oauth.session(resolver) as session:
            yield Refresher(
                config,
                pool,
                open_store(config, pool),
                store,
                Schedule(),
                session,
                safekeeping=Safekeeping(config, journal, marks, store),
                rng=random.Random(seed),
            )
    finally:
        journal.close()
        await marks.close()
        await pool.close()


async def refresh_now(refresher: Refresher, key: IntegrationKey) -> str:
    """Schedule `key` for now (as `connected` would) and run its refresh."""
    result = await refresher.reschedule(key, "oauth_connected", immediate=True)
    assert result == "scheduled", result
    due = refresher.schedule.pop_due(time.time() + 1)
    assert due is not None and due.key == key
    return await refresher.refresh(due)


async def retry_now(refresher: Refresher, key: IntegrationKey) -> str:
    """Run the retry the last failure scheduled, without waiting for it."""
    entry = refresher.schedule.get(key)
    assert entry is not None, "no retry scheduled"
    refresher.schedule.drop(key)
    return await refresher.refresh(entry)


def refreshes_counted(provider: str, outcome: str) -> float:
    labels = {"provider": provider, "outcome": outcome}
    return REGISTRY.get_sample_value("tokend_refreshes_total", labels) or 0.0


def metrics_text() -> str:
    return generate_latest(REGISTRY).decode()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def generic_provider(url: str, **settings: Any) -> dict[str, Any]:
    """A `kind = "oauth2"` provider table for a fixed token URL."""
    return {
        "kind": "oauth2",
        "token_url": url,
        "allow_http_loopback": True,
        "request_timeout_s": 2.0,
        **settings,
    }
