"""Two real `tokend run` processes on one database: one leads, and when it is
killed the other takes over and refreshes what is due."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Process, World, config_doc, eventually, write_config
from tokend.keys import leader_key

pytestmark = pytest.mark.anyio


def _process(tmp_path: Path, dsn: str, name: str) -> Process:
    doc = config_doc(
        dsn, daemon={"instance_id": name, "state_dir": str(tmp_path / name)}
    )
    config = write_config(tmp_path / f"{name}.toml", doc)
    return Process(config, tmp_path / f"{name}.log")


def _said(process: Process, message: str) -> list[dict[str, Any]]:
    return [line for line in process.log_lines() if line.get("message") == message]


async def _lock_holder(world: World) -> int | None:
    key = leader_key("tokend")
    pid: int | None = await world.conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2",
        (key >> 32) & 0xFFFFFFFF,
        key & 0xFFFFFFFF,
    )
    return pid


async def test_only_the_leader_refreshes_and_a_follower_takes_over(
    world: World, tmp_path: Path
) -> None:
    first = _process(tmp_path, world.dsn, "first").start()
    second = _process(tmp_path, world.dsn, "second")
    try:
        await eventually(lambda: _said(first, "leadership gained"), timeout_s=20)
        second.start()

        async def both_connected() -> bool:
            count = await world.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'tokend-leader'"
            )
            return bool(count == 2)

        await eventually(both_connected, timeout_s=20)

        key = await world.connect()

        async def refreshed_by(owner: str) -> bool:
            lifecycle = await world.lifecycle(key)
            return bool(
                lifecycle
                and lifecycle["ownerId"] == owner
                and lifecycle["lastScheduleSource"] == "proactive_refresh_success"
            )

        await eventually(lambda: refreshed_by("first"), timeout_s=20)
        assert _said(second, "refresh started") == []
        assert _said(second, "leadership gained") == []

        holder = await _lock_holder(world)
        first.kill()
        killed_at = time.monotonic()
        await eventually(
            lambda: _said(second, "leadership gained"), timeout_s=10, every_s=0.02
        )
        takeover_s = time.monotonic() - killed_at
        assert await _lock_holder(world) not in (None, holder)
        # The next refresh of the integration is due within seconds.
        await eventually(lambda: refreshed_by("second"), timeout_s=20)
        assert takeover_s < 10
    finally:
        first.stop()
        second.stop()
