"""The systemd unit: systemd's own checks, and the settings the daemon relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "tokend.service"
SYSUSERS = ROOT / "systemd" / "tokend.sysusers"

# systemd-analyze security rates the exposure SAFE, OK, MEDIUM, EXPOSED or UNSAFE.
ACCEPTED_RATINGS = {"SAFE", "OK"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with systemd)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def directives(text: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file; keys may repeat, as systemd allows."""
    found: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found[key.strip()].append(value.strip())
    return found


def test_verify_passes(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")

    # verify insists that ExecStart's binary exists, and /usr/bin/tokend is
    # only there once the package is installed. Check a copy that starts this
    # Python instead; every other line is verified as written.
    unit_text = UNIT.read_text()
    copy = tmp_path / "tokend.service"
    copy.write_text(
        re.sub(
            r"^ExecStart=/usr/bin/tokend ",
            f"ExecStart={sys.executable} -m tokend ",
            unit_text,
            count=1,
            flags=re.MULTILINE,
        )
    )
    assert copy.read_text() != unit_text, "ExecStart=/usr/bin/tokend not found"

    result = run(analyze, "verify", str(copy))

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "tokend.service" not in output, output


def test_security_exposure_is_ok_or_better() -> None:
    analyze = tool("systemd-analyze")

    result = run(analyze, "security", "--offline=true", "--no-pager", str(UNIT))

    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    last_line = result.stdout.strip().splitlines()[-1]
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", last_line)
    assert match, result.stdout + result.stderr
    exposure, rating = float(match.group(1)), match.group(2)
    assert rating in ACCEPTED_RATINGS, last_line
    assert exposure < 5.0, last_line


def test_sysusers_entry_is_valid(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")

    # --root keeps even a mistaken run away from this machine's /etc.
    result = run(sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS))

    assert result.returncode == 0, result.stderr
    assert "Creating user 'tokend'" in result.stdout + result.stderr


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    unit = directives(UNIT.read_text())

    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/usr/bin/tokend run --config /etc/tokend/config.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["WatchdogSec"] == ["30"]
    # The daemon drains for up to 20 s; systemd must wait longer than that.
    assert int(unit["TimeoutStopSec"][0]) > 20
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["tokend"]
    assert unit["StateDirectory"] == ["tokend"]
    assert "TOKEND_LOG_FORMAT=json" in unit["Environment"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["ProtectSystem"] == ["strict"]
