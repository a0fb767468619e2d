"""The operator's commands, run as real processes: status, notify, reset and
refresh against a real database, with a leader running or not."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import anyio
import orjson
import pytest

from tests.helpers import (
    World,
    config_doc,
    eventually,
    free_port,
    running,
    write_config,
)
from tokend.fake_endpoint import Fault
from tokend.lifecycle import iso
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio


async def tokend(
    *args: str, env: dict[str, str] | None = None
) -> CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")}
    return await anyio.run_process(
        [sys.executable, "-m", "tokend", *args],
        check=False,
        env={**base, **(env or {})},
    )


def _err(result: CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


@pytest.fixture
def config_file(world: World, tmp_path: Path) -> str:
    return str(write_config(tmp_path / "tokend.toml", config_doc(world.dsn)))


def _key_args(key: IntegrationKey) -> list[str]:
    return ["--tenant", str(key.tenant), "--integration", str(key.integration_id)]


def _lifecycle(**fields: Any) -> dict[str, Any]:
    return {"tokenLifecycle": {"scheduleNonce": 1, **fields}}


def _reconnect_required() -> dict[str, Any]:
    return _lifecycle(
        status="reconnect_required",
        reconnectRequired=True,
        reconnectReason="refresh token rejected (invalid_grant)",
        lastRefreshFailure={
            "code": "invalid_grant",
            "message": "token endpoint answered 400 invalid_grant",
            "failedAt": iso(time.time() - 60),
        },
    )


def _backing_off() -> dict[str, Any]:
    now = time.time()
    return _lifecycle(
        status="retrying",
        expiresAt=iso(now + 3600),
        nextRefreshAt=iso(now + 3600),
        consecutiveFailures=4,
    )


# -- status ------------------------------------------------------------------


async def test_status_lists_counts_deadlines_and_what_needs_a_human(
    world: World, config_file: str
) -> None:
    now = time.time()
    due = [
        await world.connect(
            notify=False,
            settings=_lifecycle(
                status="scheduled",
                expiresAt=iso(now + 3600),
                nextRefreshAt=iso(now + 600 * (i + 1)),
            ),
        )
        for i in range(3)
    ]
    broken = await world.connect(notify=False, settings=_reconnect_required())
    await world.connect(notify=False, settings=_backing_off())

    result = await tokend("status", "--config", config_file, "--json", "--limit", "2")

    assert result.returncode == 0, _err(result)
    doc = orjson.loads(result.stdout)
    assert doc["leader"] is None
    assert doc["counts"] == {"scheduled": 3, "reconnect_required": 1, "retrying": 1}
    assert doc["tokens_expired"] == 0
    assert [n["integration_id"] for n in doc["next"]] == [
        str(due[0].integration_id),
        str(due[1].integration_id),
    ]
    (attention,) = doc["attention"]
    assert attention["integration_id"] == str(broken.integration_id)
    assert attention["failure_code"] == "invalid_grant"
    assert attention["reason"] == "refresh token rejected (invalid_grant)"

    text = await tokend("status", "--config", config_file)
    assert text.returncode == 0
    out = text.stdout.decode()
    assert "leader: none" in out
    assert "integrations: 5 active (1 reconnect_required, 1 retrying, 3 scheduled)" in (
        out
    )
    assert f"reconnect_required  {broken.tenant} {broken.integration_id}" in out


async def test_status_names_the_leader_while_one_runs(
    world: World, config_file: str
) -> None:
    async with running(world.config()):
        result = await tokend("status", "--config", config_file, "--json")
    assert result.returncode == 0, _err(result)
    leader = orjson.loads(result.stdout)["leader"]
    assert leader is not None and isinstance(leader["pid"], int)


# -- notify ------------------------------------------------------------------


async def test_notify_reaches_the_leader(world: World, config_file: str) -> None:
    async with running(world.config()) as daemon:
        key = await world.connect()
        await eventually(lambda: key in daemon.schedule)

        result = await tokend(
            "notify", "disconnected", "--config", config_file, *_key_args(key)
        )

        assert result.returncode == 0, _err(result)
        assert result.stdout.decode().startswith("sent disconnected for ")
        await eventually(lambda: key not in daemon.schedule)
        lifecycle = await world.lifecycle(key)
        assert lifecycle and lifecycle["status"] == "inactive"

        resync = await tokend("notify", "resync", "--config", config_file)
        assert resync.returncode == 0, _err(resync)


async def test_notify_without_a_leader_refuses_rather_than_lose_it(
    world: World, config_file: str
) -> None:
    key = await world.connect(notify=False)
    result = await tokend(
        "notify", "connected", "--config", config_file, *_key_args(key)
    )
    assert result.returncode == 1
    assert _err(result) == (
        "tokend: no tokend leader holds the lock 'tokend'; nothing would receive"
        " the request (is tokend running?)\n"
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ["connected", "--tenant", "nope", "--integration", "x"],
            "argument --tenant: not a uuid: 'nope'",
        ),
        (
            ["connected", "--tenant", "00000000-0000-0000-0000-000000000001"],
            "give both --tenant and --integration",
        ),
        (
            [
                "resync",
                "--tenant",
                "00000000-0000-0000-0000-000000000001",
                "--integration",
                "00000000-0000-0000-0000-000000000002",
            ],
            "resync takes no integration",
        ),
        (["refreshed"], "refreshed needs --tenant and --integration"),
        (["explode"], "argument event: invalid choice: 'explode'"),
    ],
)
async def test_notify_usage_errors_exit_2_naming_the_problem(
    config_file: str, args: list[str], problem: str
) -> None:
    result = await tokend("notify", *args, "--config", config_file)
    assert result.returncode == 2
    assert problem in _err(result)
    assert len(_err(result).strip().splitlines()) == 1


async def test_an_unknown_integration_is_named(world: World, config_file: str) -> None:
    key = _some_key()
    async with running(world.config()):
        result = await tokend("reset", "--config", config_file, *_key_args(key))
    assert result.returncode == 1
    assert _err(result) == (
        f"tokend: no integration {key.integration_id} of tenant {key.tenant}"
        " in rmm_integrations\n"
    )


# -- reset -------------------------------------------------------------------


async def test_reset_clears_reconnect_required_and_says_what_follows(
    world: World, config_file: str
) -> None:
    key = await world.connect(notify=False, settings=_reconnect_required())
    async with running(world.config()) as daemon:
        assert key not in daemon.schedule
        result = await tokend("reset", "--config", config_file, *_key_args(key))
        assert result.returncode == 0, _err(result)
        assert key in daemon.schedule
    assert result.stdout.decode().startswith(
        f"reset: {key.tenant} {key.integration_id} is scheduled, next refresh at 20"
    )
    lifecycle = await world.lifecycle(key)
    assert lifecycle and lifecycle["reconnectRequired"] is False


# -- refresh -----------------------------------------------------------------


async def test_refresh_bypasses_backoff_once_a_minute(
    world: World, config_file: str
) -> None:
    key = await world.connect(notify=False, settings=_backing_off())
    # Next regular refresh in 50 minutes: only a request can cause one here.
    async with running(world.config(scheduler={"buffer_s": 600.0})):
        result = await tokend("refresh", "--config", config_file, *_key_args(key))
        assert result.returncode == 0, _err(result)
        assert result.stdout.decode().startswith("refreshed: the access token now")
        assert len(world.refreshes()) == 1

        again = await tokend(
            "refresh", "--config", config_file, *_key_args(key), "--wait", "3"
        )
    assert again.returncode == 1
    assert _err(again) == (
        "tokend: no refresh attempt within 3 s (the leader takes one refresh"
        " request a minute per integration)\n"
    )
    assert len(world.refreshes()) == 1
    lifecycle = await world.lifecycle(key)
    assert lifecycle and lifecycle["consecutiveFailures"] == 0


async def test_refresh_reports_a_failed_refresh(world: World, config_file: str) -> None:
    key = await world.connect(notify=False, settings=_backing_off())
    # Retry-After keeps the retry from succeeding before the command looks.
    busy = Fault(status=503, body=b"busy", headers={"Retry-After": "60"})
    world.endpoint.faults.append(busy)
    async with running(world.config()):
        result = await tokend("refresh", "--config", config_file, *_key_args(key))
    assert result.returncode == 1
    assert _err(result).startswith(
        "tokend: refresh failed, now retrying: http_503: token endpoint answered 503"
    )


async def test_refresh_of_a_reconnect_required_integration_points_at_reset(
    world: World, config_file: str
) -> None:
    key = await world.connect(notify=False, settings=_reconnect_required())
    result = await tokend("refresh", "--config", config_file, *_key_args(key))
    assert result.returncode == 1
    assert "needs reconnecting" in _err(result) and "tokend reset" in _err(result)
    assert world.refreshes("ok") == []


# -- configuration and the database ----------------------------------------


async def test_a_dead_database_is_a_runtime_failure(tmp_path: Path) -> None:
    dead = f"postgresql://tokend@127.0.0.1:{free_port()}/tokend"
    config = write_config(tmp_path / "dead.toml", config_doc(dead))
    for args in (["status"], ["refresh", *_key_args(_some_key())]):
        result = await tokend(*args, "--config", str(config))
        assert result.returncode == 1, args
        err = _err(result)
        assert err.startswith("tokend: cannot connect to the database: "), err
        assert len(err.strip().splitlines()) == 1


def _some_key() -> IntegrationKey:
    return IntegrationKey(uuid.uuid4(), uuid.uuid4())


async def test_config_comes_from_the_flag_or_tokend_config(
    tmp_path: Path, config_file: str
) -> None:
    missing = await tokend("status")
    assert missing.returncode == 2
    assert "--config is required (or set TOKEND_CONFIG)" in _err(missing)

    unreadable = await tokend("status", "--config", str(tmp_path / "absent.toml"))
    assert unreadable.returncode == 2
    assert _err(unreadable).startswith("tokend: config: ")
    assert "absent.toml: cannot read" in _err(unreadable)

    from_env = await tokend("status", "--json", env={"TOKEND_CONFIG": config_file})
    assert from_env.returncode == 0, _err(from_env)
    assert orjson.loads(from_env.stdout)["counts"] == {}


async def test_run_names_a_listen_address_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        doc = config_doc(f"postgresql://tokend@127.0.0.1:{free_port()}/tokend")
        doc["http"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}
        config = write_config(tmp_path / "busy.toml", doc)
        with anyio.fail_after(30):
            result = await tokend("run", "--config", str(config))
    assert result.returncode == 1
    assert _err(result).endswith(
        f"tokend: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
