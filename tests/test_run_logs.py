"""The logs of the real `tokend run`: one JSON object a line telling each
decision, or text when asked (flag, TOKEND_LOG_FORMAT) or on a terminal."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import (
    CLIENT_ID,
    Process,
    World,
    config_doc,
    eventually,
    free_port,
    write_config,
)
from tokend.fake_endpoint import Fault

pytestmark = pytest.mark.anyio

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) +tokend\.\w+: "
)


async def test_each_decision_is_one_json_line_with_its_context(
    world: World, tmp_path: Path
) -> None:
    doc = config_doc(world.dsn, daemon={"instance_id": "logs"})
    process = Process(write_config(tmp_path / "c.toml", doc), tmp_path / "logs.log")
    # Rotated tokens live two hours: each integration is refreshed once here.
    world.endpoint.expires_in_s = 7200
    process.start()
    try:
        await eventually(lambda: process.said("leadership gained"), timeout_s=20)
        healthy = await world.connect()
        await eventually(lambda: process.said("refresh succeeded"))

        world.endpoint.faults.append(Fault(status=503, body=b"<html>busy</html>"))
        flaky = await world.connect()
        await eventually(lambda: process.said("refresh failed; will retry"))

        dead = await world.connect(notify=False)
        world.endpoint.rotate((await world.credentials(dead)).refresh_token, CLIENT_ID)
        await world.notify("connected", dead)
        rejected = "reconnect required: the refresh token was rejected"
        await eventually(lambda: process.said(rejected))

        process.signal(signal.SIGHUP)
        await eventually(lambda: process.said("config reloaded"))
        secrets = [
            (await world.credentials(k)).refresh_token for k in (healthy, flaky, dead)
        ]
        process.signal(signal.SIGTERM)
        assert await process.exited(15) == 0
    finally:
        process.stop()

    raw = process.log_path.read_bytes()
    lines = [orjson.loads(line) for line in raw.splitlines()]
    for line in lines:
        assert isinstance(line, dict)
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
    for secret in secrets:
        assert secret.encode() not in raw

    def one(message: str, **context: Any) -> dict[str, Any]:
        found = [
            line
            for line in process.said(message)
            if all(line.get(k) == v for k, v in context.items())
        ]
        assert found, (message, context)
        return found[0]

    h = {"tenant": str(healthy.tenant), "integration_id": str(healthy.integration_id)}
    f = {"tenant": str(flaky.tenant), "integration_id": str(flaky.integration_id)}
    d = {"tenant": str(dead.tenant), "integration_id": str(dead.integration_id)}
    assert one("leadership gained")["role"] == "leader"
    # A load that runs before the notification backfills first: either way
    # the connect itself is one decision line.
    decision = one("refresh scheduled", source="oauth_connected", **h)
    assert "next_refresh_at" in decision
    assert one("refresh started", **h)["provider"] == "ninjaone"
    success = one("refresh succeeded", **h)
    assert success["new_expires_at"] > success["old_expires_at"]
    assert success["next_refresh_at"] < success["new_expires_at"]
    failure = one("refresh failed; will retry", **f)
    assert failure["http_status"] == 503
    assert failure["error_code"] == "http_503"
    assert failure["retry_in_s"] >= 0
    assert one(rejected, **d)["error_code"] == "invalid_grant"
    assert one("config reloaded")["restart_needed"] == []
    assert one("stopping")["signal"] == "SIGTERM"
    assert one("leadership released")["role"] == "follower"
    assert lines[-1]["message"] == "stopped"


def _run(
    tmp_path: Path, name: str, args: list[str], env: dict[str, str], tty: bool = False
) -> bytes:
    """Start `tokend run` on a dead database, read what it says at first
    (to a terminal when `tty`), stop it; return the bytes."""
    dead = f"postgresql://tokend@127.0.0.1:{free_port()}/tokend"
    doc = config_doc(dead)
    doc["http"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
    config = write_config(tmp_path / f"{name}.toml", doc)
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")}
    command = [sys.executable, "-m", "tokend", "run", "--config", str(config), *args]
    if not tty:
        with subprocess.Popen(
            command, stderr=subprocess.PIPE, env={**base, **env}
        ) as proc:
            return _first_lines(proc, proc.stderr)
    main, child = pty.openpty()
    with subprocess.Popen(command, stderr=child, env={**base, **env}) as proc:
        os.close(child)
        with os.fdopen(main, "rb", buffering=0) as terminal:
            return _first_lines(proc, terminal)


def _first_lines(proc: subprocess.Popen[bytes], stream: Any) -> bytes:
    # "http listening" comes first; "database unreachable" soon after.
    said = b""
    try:
        while b"database unreachable" not in said and proc.poll() is None:
            said += os.read(stream.fileno(), 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    return said


@pytest.mark.parametrize(
    ("args", "env", "tty", "expected"),
    [
        ([], {}, False, "json"),
        ([], {}, True, "text"),
        (["--log-format", "text"], {}, False, "text"),
        ([], {"TOKEND_LOG_FORMAT": "text"}, False, "text"),
        ([], {"TOKEND_LOG_FORMAT": "json"}, True, "json"),
        (["--log-format", "json"], {"TOKEND_LOG_FORMAT": "text"}, False, "json"),
    ],
    ids=["pipe", "tty", "flag", "env", "env-over-tty", "flag-over-env"],
)
def test_log_format_follows_flag_environment_and_terminal(
    tmp_path: Path, args: list[str], env: dict[str, str], tty: bool, expected: str
) -> None:
    said = _run(tmp_path, "format", args, env, tty)

    lines = said.decode().replace("\r\n", "\n").strip().splitlines()
    assert any("database unreachable" in line for line in lines), lines
    for line in lines:
        if expected == "json":
            assert isinstance(orjson.loads(line), dict), line
        else:
            assert TEXT_LINE.match(line), line


def test_a_bad_tokend_log_format_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", config_doc("postgresql://x@127.0.0.1/x"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")}
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "run", "--config", str(config)],
        env={**base, "TOKEND_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "tokend: TOKEND_LOG_FORMAT: expected one of auto, json, text, got 'xml'\n"
    )
