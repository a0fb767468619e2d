"""The lock connection routed through a transaction-pooling proxy
(pgbouncer): tokend proves its session lock unreliable and refuses to lead,
with an error that says why, instead of risking two leaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults import PgBouncer, said, spawn
from tests.helpers import World, eventually

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("pgbouncer") is None,
        reason="pgbouncer is not installed (apt-get install pgbouncer)",
    ),
]

# What tokend's connections set at connect; a pooler told to ignore them
# lets the connections through and drops the settings.
SETTINGS = (
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "lock_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
)


def _port(dsn: str) -> int:
    return int(dsn.rsplit(":", 1)[1].split("/")[0])


def _stderr(path: Path) -> str:
    return path.read_text()


@pytest.mark.parametrize(
    ("ignore", "connect_query", "reason"),
    [
        ((), None, "refused the settings the lock connection sets at connect"),
        (SETTINGS, None, "lock_timeout on the lock connection is 0 ms"),
        (
            SETTINGS,
            "SET lock_timeout = 1000",
            "a second connection was granted the leader lock",
        ),
    ],
    ids=["refused-settings", "dropped-settings", "shared-session"],
)
async def test_a_transaction_pooler_makes_tokend_refuse_to_lead(
    world: World,
    tmp_path: Path,
    ignore: tuple[str, ...],
    connect_query: str | None,
    reason: str,
) -> None:
    with PgBouncer(
        _port(world.dsn), mode="transaction", ignore=ignore, connect_query=connect_query
    ) as bouncer:
        a = spawn(tmp_path, bouncer.url(world.dsn), "a").start()
        try:
            assert a.wait(30) == 2
            text = (tmp_path / "a.log").read_text()
            assert reason in text, text[-3000:]
            assert "database.dsn" in text
            assert not said(a, "leadership gained")
        finally:
            a.stop()


async def test_a_session_pooler_passes_the_checks(world: World, tmp_path: Path) -> None:
    """The checks are no blanket refusal: behind a pooler in session mode
    (each client its own server session) tokend leads."""
    with PgBouncer(
        _port(world.dsn),
        mode="session",
        ignore=SETTINGS,
        connect_query="SET lock_timeout = 1000",
    ) as bouncer:
        a = spawn(tmp_path, bouncer.url(world.dsn), "a").start()
        try:
            await eventually(lambda: said(a, "leadership gained"), timeout_s=20)
            key = await world.connect()
            await eventually(world.refreshes, timeout_s=20)
            lifecycle = await world.lifecycle(key)
            assert lifecycle is not None
        finally:
            a.stop()
