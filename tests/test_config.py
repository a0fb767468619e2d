"""Config validation: every problem named by its key, secrets never echoed."""

from __future__ import annotations

import base64
import subprocess
import sys
import tomllib
from dataclasses import is_dataclass
from pathlib import Path

import pytest

from tokend.config import load, parse
from tokend.errors import ConfigErrors

ROOT = Path(__file__).resolve().parent.parent
KEY = base64.b64encode(b"k" * 32).decode()
BASE = {"database": {"dsn": "postgresql://x@127.0.0.1/db"}, "secrets": {"key": KEY}}


def _errors(doc: dict, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        parse(doc, env or {}, "test")
    return [str(e) for e in caught.value.errors]


def _with(section: str, **values: object) -> dict:
    doc = {k: dict(v) for k, v in BASE.items()}
    doc.setdefault(section, {}).update(values)
    return doc


def test_defaults_are_the_documented_ones() -> None:
    config = parse(BASE, {}, "test")
    assert config.scheduler.buffer_s == 900
    assert config.scheduler.min_delay_s == 30
    assert config.leader.lock_timeout_s == 5
    assert config.retry.initial_s == 5 and config.retry.max_s == 300
    assert config.http.listen == "127.0.0.1:9464"
    assert config.providers["ninjaone"].token_path == "/oauth/token"
    assert config.providers["ninjaone"].allow_http_loopback is False


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "scheduler",
            "buffer_s",
            -5,
            "scheduler.buffer_s: expected seconds > 0, got -5",
        ),
        (
            "scheduler",
            "buffer_s",
            "15m",
            "scheduler.buffer_s: expected seconds, got str",
        ),
        (
            "scheduler",
            "concurrency",
            0,
            "scheduler.concurrency: expected an integer from 1 to 1000000",
        ),
        (
            "scheduler",
            "concurrency",
            True,
            "scheduler.concurrency: expected an integer",
        ),
        ("http", "listen", "9464", "http.listen: expected host:port"),
        ("log", "level", "loud", "log.level: expected one of debug, info"),
        ("notify", "channel", "a;b", "notify.channel: expected a Postgres identifier"),
        ("scheduler", "bufer_s", 5, "scheduler.bufer_s: unknown key"),
    ],
)
def test_bad_values_name_the_key(
    section: str, key: str, value: object, expected: str
) -> None:
    errors = _errors(_with(section, **{key: value}))
    assert any(e.startswith(expected) for e in errors), errors


def test_every_problem_is_reported_at_once() -> None:
    doc = _with("scheduler", buffer_s=0, spread_s=-1)
    doc["nonsense"] = {}
    del doc["database"]
    errors = _errors(doc)
    assert len(errors) == 4, errors
    assert "database.dsn: required (or dsn_env, dsn_file)" in errors
    assert "nonsense: unknown section" in errors


def test_secrets_come_from_env_or_file_and_are_never_echoed(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    doc = {
        "database": {"dsn_env": "TOKEND_DSN"},
        "secrets": {"key_file": str(key_file)},
    }
    config = parse(doc, {"TOKEND_DSN": "postgresql://secret@h/db"}, "t")
    assert config.database.dsn == "postgresql://secret@h/db"
    assert config.secrets.key == KEY

    errors = _errors(
        {"database": {"dsn_env": "UNSET_VAR"}, "secrets": {"key_file": "/nope/key"}}
    )
    assert "database.dsn_env: environment variable UNSET_VAR is not set" in errors
    assert any(e.startswith("secrets.key_file: cannot read /nope/key") for e in errors)

    both = _errors(
        {
            "database": {"dsn": "postgresql://pw@h/d", "dsn_env": "X"},
            "secrets": {"key": KEY},
        }
    )
    assert both == ["database.dsn: give only one of dsn, dsn_env"]
    assert not any("pw@h" in e for e in both)


def test_cross_checks_between_settings() -> None:
    errors = _errors(_with("leader", heartbeat_interval_s=2, heartbeat_timeout_s=3))
    assert errors[0].startswith("leader.heartbeat_timeout_s: must be shorter")


def test_example_config_lists_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    uncommented = "\n".join(
        line.lstrip("# ") for line in text.splitlines() if "=" in line
    )
    config = parse(BASE, {}, "test")
    for section in (
        "database",
        "leader",
        "scheduler",
        "retry",
        "notify",
        "http",
        "log",
        "secrets",
        "daemon",
    ):
        for key, value in vars(getattr(config, section)).items():
            if is_dataclass(value):
                # A sub-table such as [secrets.vault]: its header and keys.
                assert f"[{section}.{key}]" in text, f"{section}.{key} missing"
                names = list(vars(value))
            else:
                names = [key]
            for name in names:
                assert (
                    f"{name} =" in uncommented
                    or f"{name}_env =" in uncommented
                    or f"{name}_file =" in uncommented
                    or f"[{section}.{name}." in text
                ), f"{section}.{name} missing"
    tomllib.loads(text)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[database]\ndsn = "postgresql://x@127.0.0.1/d"\n[secrets]\nkey = "{KEY}"\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler]\nbuffer_s = -5\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[scheduler\n")

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokend", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert check(good).returncode == 0
    result = check(bad)
    assert result.returncode == 2
    assert "scheduler.buffer_s: expected seconds > 0, got -5" in result.stderr
    assert "Traceback" not in result.stderr
    assert check(broken).returncode == 2
    assert "invalid TOML" in check(broken).stderr
    assert check(tmp_path / "missing.toml").returncode == 2


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[database]\ndsn = "postgresql://x@127.0.0.1/d"\n[secrets]\nkey = "{KEY}"\n'
    )
    assert load(path).source == str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e12])
def test_durations_must_be_finite_and_bounded(value: float) -> None:
    errors = _errors(_with("scheduler", buffer_s=value))
    assert any(
        e.startswith("scheduler.buffer_s: expected seconds up to") for e in errors
    )


def test_a_secret_pasted_into_the_wrong_key_is_not_echoed(tmp_path: Path) -> None:
    pasted_dsn = "postgresql://u:PASTEDPW@127.0.0.1:1/db"
    pasted_key = KEY
    errors = _errors(
        {"database": {"dsn_env": pasted_dsn}, "secrets": {"key_file": pasted_key}}
    )
    assert "database.dsn_env: expected the name of an environment variable" in errors
    assert not any("PASTEDPW" in e or pasted_key in e for e in errors), errors


def test_key_material_and_dsn_are_checked_without_quoting_them(tmp_path: Path) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(bytes(range(200, 232)))
    errors = _errors(
        {
            "database": {"dsn": "postgresql://u:SECRETPW@[::1:5432/db"},
            "secrets": {"key_file": str(raw), "old_keys": {"k0": {"key": "zzz"}}},
        }
    )
    assert any(
        e.startswith("database.dsn: not a valid postgresql:// URL") for e in errors
    )
    assert any(e.startswith("secrets.key_file:") and "UTF-8" in e for e in errors)
    assert "secrets.old_keys.k0: key 'k0' is not valid base64" in errors
    assert not any("SECRETPW" in e for e in errors)
    short = _errors(_with("secrets", key=base64.b64encode(b"short").decode()))
    assert "secrets.key: key 'k1' must be 32 bytes, got 5" in short


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b'[log]\nlevel = "info"\n\xff\xfe\n')
    with pytest.raises(ConfigErrors, match="not UTF-8 text"):
        load(path)
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
