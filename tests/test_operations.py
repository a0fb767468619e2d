"""Operating the real `tokend run` process: HTTP endpoints and metrics,
reloads on SIGHUP, draining on SIGTERM, and systemd's notifications."""

from __future__ import annotations

import math
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    Process,
    World,
    config_doc,
    eventually,
    free_port,
    write_config,
)
from tests.test_deploy_files import METRICS
from tokend.lifecycle import iso, parse_iso
from tokend.secrets import APP
from tokend.store import IntegrationKey

pytestmark = pytest.mark.anyio


def _doc(dsn: str, name: str, port: int, **overrides: dict[str, Any]) -> dict[str, Any]:
    doc = config_doc(dsn, **overrides)
    doc["daemon"]["instance_id"] = name
    doc["daemon"]["state_dir"] = f"{doc['daemon']['state_dir']}/{name}"
    doc["http"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}
    return doc


def _process(
    tmp_path: Path, dsn: str, name: str, **overrides: dict[str, Any]
) -> tuple[Process, dict[str, Any]]:
    port = free_port()
    doc = _doc(dsn, name, port, **overrides)
    path = write_config(tmp_path / f"{name}.toml", doc)
    return Process(path, tmp_path / f"{name}.log", port), doc


async def _leading(process: Process) -> None:
    await eventually(lambda: process.said("leadership gained"), timeout_s=20)
    await eventually(lambda: process.said("integrations loaded"), timeout_s=20)


def _lifecycle(**fields: Any) -> dict[str, Any]:
    return {"tokenLifecycle": {"scheduleNonce": 1, **fields}}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def _seed_every_status(world: World) -> dict[str, IntegrationKey]:
    now = time.time()
    return {
        # No lifecycle yet: backfilled at start, then refreshed in seconds.
        "fresh": await world.connect(notify=False),
        "reconnect": await world.connect(
            notify=False,
            settings=_lifecycle(
                status="reconnect_required",
                reconnectRequired=True,
                reconnectReason="refresh token rejected (invalid_grant)",
            ),
        ),
        # Failing, backing off, and its access token already lapsed.
        "lapsed": await world.connect(
            notify=False,
            expires_in_s=-60,
            settings=_lifecycle(
                status="retrying",
                expiresAt=iso(now - 60),
                nextRefreshAt=iso(now + 3600),
                consecutiveFailures=3,
            ),
        ),
        "stuck": await world.connect(
            notify=False,
            settings=_lifecycle(
                status="unschedulable",
                lastRefreshFailure={"code": "credentials_missing", "message": "x"},
            ),
        ),
    }


# -- /metrics --------------------------------------------------------------


async def test_metrics_of_a_leader_are_all_there_and_mean_what_they_say(
    world: World, tmp_path: Path
) -> None:
    keys = await _seed_every_status(world)
    process, _ = _process(tmp_path, world.dsn, "metrics")
    process.start()
    try:
        await _leading(process)
        await eventually(lambda: process.said("refresh succeeded"), timeout_s=20)
        await world.notify("refreshed", keys["fresh"])

        async def notification_counted() -> tuple[int, str] | None:
            status, text = await process.get("/metrics")
            counted = 'event="refreshed",result="scheduled"} 1.0' in text
            return (status, text) if counted else None

        status, text = await eventually(notification_counted)
    finally:
        process.stop()

    assert status == 200
    families = {f.name for f in text_string_to_metric_families(text)}
    # Counters are listed without their _total suffix by the parser.
    exposed = {f + "_total" if f + "_total" in METRICS else f for f in families}
    assert exposed == METRICS
    samples = _samples(text)
    assert _value(samples, "tokend_leader") == 1
    assert _value(samples, "tokend_leader_transitions_total", change="gained") == 1
    assert _value(samples, "tokend_integrations", status="scheduled") == 1
    assert _value(samples, "tokend_integrations", status="retrying") == 1
    assert _value(samples, "tokend_integrations", status="reconnect_required") == 1
    assert _value(samples, "tokend_integrations", status="unschedulable") == 1
    assert _value(samples, "tokend_tokens_expired") == 1
    # In the heap: the fresh one, rescheduled, and the one backing off.
    assert _value(samples, "tokend_heap_entries") == 2
    next_deadline = _value(samples, "tokend_next_deadline_seconds")
    assert not math.isnan(next_deadline) and next_deadline < 60
    ninja = {"provider": "ninjaone"}
    assert _value(samples, "tokend_refreshes_total", outcome="success", **ninja) >= 1
    assert _value(samples, "tokend_refreshes_total", outcome="transient", **ninja) == 0
    assert _value(samples, "tokend_refresh_duration_seconds_count", **ninja) >= 1
    # Every answer went to the journal, and the database took every one.
    assert _value(samples, "tokend_journal_window_seconds_count") >= 1
    assert _value(samples, "tokend_journal_pending") == 0
    assert _value(samples, "tokend_refresh_lateness_seconds_count") >= 1
    remaining = _value(samples, "tokend_token_remaining_seconds_count")
    assert remaining >= 1
    # The token had an hour left when the first refresh started.
    assert _value(samples, "tokend_token_remaining_seconds_sum") > 3000
    refreshed = {"type": "INTEGRATION_TOKEN_REFRESHED"}
    assert _value(samples, "tokend_events_emitted_total", **refreshed) >= 1
    notified = {"event": "refreshed", "result": "scheduled"}
    assert _value(samples, "tokend_notifications_total", **notified) == 1
    assert _value(samples, "tokend_db_reconnects_total", connection="leader") == 0
    assert _value(samples, "tokend_config_reloads_total", result="failure") == 0
    for _, labels in samples:
        assert not {"tenant", "integration_id", "integration"} & dict(labels).keys()


async def test_promtool_accepts_a_real_scrape(world: World, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    await world.connect(notify=False)
    process, _ = _process(tmp_path, world.dsn, "promtool")
    process.start()
    try:
        await _leading(process)
        await eventually(lambda: process.said("refresh succeeded"), timeout_s=20)
        _, text = await process.get("/metrics")
    finally:
        process.stop()

    with anyio.fail_after(60):
        result = await anyio.run_process(
            [promtool, "check", "metrics"], input=text.encode(), check=False
        )
    said = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, said
    # promtool prints nothing when it has no complaint, not even a lint hint.
    assert said == ""


# -- /healthz, /readyz, /status ---------------------------------------------


async def test_health_readiness_and_status_of_a_leader_and_a_follower(
    world: World, tmp_path: Path
) -> None:
    keys = await _seed_every_status(world)
    first, _ = _process(tmp_path, world.dsn, "first", scheduler={"buffer_s": 600.0})
    second, _ = _process(tmp_path, world.dsn, "second")
    first.start()
    try:
        await _leading(first)
        second.start()
        await eventually(lambda: second.said("ready"), timeout_s=20)

        assert await first.get("/healthz") == (200, {"ok": True})
        assert await second.get("/healthz") == (200, {"ok": True})
        assert await first.get("/readyz") == (200, {"ready": True, "role": "leader"})
        ready = await second.get("/readyz")
        assert ready == (200, {"ready": True, "role": "follower"})

        _, leader = await first.get("/status")
        _, follower = await second.get("/status")
    finally:
        first.stop()
        second.stop()

    assert leader["role"] == "leader" and leader["instance_id"] == "first"
    assert leader["counts"] == {
        "scheduled": 1,
        "retrying": 1,
        "reconnect_required": 1,
        "unschedulable": 1,
    }
    assert leader["tokens_expired"] == 1
    assert leader["scheduled"] == 2
    due = {(n["tenant"], n["integration_id"]): n for n in leader["next"]}
    fresh = keys["fresh"]
    entry = due[(str(fresh.tenant), str(fresh.integration_id))]
    expires = (await world.credentials(fresh)).expires_at
    assert parse_iso(entry["due"], "due") == pytest.approx(expires - 600, abs=2)
    assert entry["provider"] == "ninjaone"
    assert leader["last_reload"] is None
    assert follower["role"] == "follower"
    assert follower["scheduled"] == 0 and follower["next"] == []


async def test_a_dead_database_is_healthy_but_not_ready(tmp_path: Path) -> None:
    # Nothing listens on this port: every connection is refused at once.
    dead = f"postgresql://tokend@127.0.0.1:{free_port()}/tokend"
    process, _ = _process(tmp_path, dead, "orphan")
    process.start()
    try:
        await eventually(lambda: process.said("database unreachable"), timeout_s=20)
        assert await eventually(lambda: process.answers("/healthz")) == (
            200,
            {"ok": True},
        )
        assert await process.get("/readyz") == (
            503,
            {"ready": False, "role": "starting"},
        )
        _, text = await process.get("/metrics")
        samples = _samples(text)
        assert _value(samples, "tokend_leader") == 0
        assert _value(samples, "tokend_db_reconnects_total", connection="leader") >= 1

        process.signal(signal.SIGTERM)
        assert await process.exited(10) == 0
    finally:
        process.stop()


# -- SIGHUP ------------------------------------------------------------------


async def test_a_valid_reload_recomputes_the_schedule_without_losing_the_lead(
    world: World, tmp_path: Path
) -> None:
    keys = [await world.connect(notify=False) for _ in range(3)]
    process, doc = _process(
        tmp_path, world.dsn, "reload", scheduler={"buffer_s": 600}, log={}
    )
    # The level comes from the file, so that a reload can change it.
    process.start(args=("--log-format", "json"))
    try:
        await _leading(process)
        before = await _deadlines(process)
        expires = {k: (await world.credentials(k)).expires_at for k in keys}
        for key in keys:
            assert before[key] == pytest.approx(expires[key] - 600, abs=2)

        doc["scheduler"]["buffer_s"] = 1800.0
        doc["scheduler"]["concurrency"] = 4
        doc["log"] = {"level": "warning"}
        # Bound at start: logged as needing a restart, and not applied.
        doc["http"]["listen"] = f"127.0.0.1:{free_port()}"
        doc["database"]["dsn"] += "?application_name=elsewhere"
        doc["leader"]["lock_name"] = "another"
        write_config(process.config_path, doc)
        process.signal(signal.SIGHUP)

        await eventually(lambda: process.said("config reloaded"))
        after = await _deadlines(process)
        for key in keys:
            assert after[key] == pytest.approx(expires[key] - 1800, abs=2)
        _, status = await process.get("/status")
        reload = status["last_reload"]
        assert reload["result"] == "success"
        assert sorted(reload["restart_needed"]) == [
            "database.dsn",
            "http.listen",
            "leader.lock_name",
        ]
        assert "scheduler.buffer_s" in reload["changed"]
        assert "database.dsn" not in reload["changed"]
        assert status["role"] == "leader"

        _, text = await process.get("/metrics")
        samples = _samples(text)
        assert _value(samples, "tokend_config_reloads_total", result="success") == 1
        assert _value(samples, "tokend_leader_transitions_total", change="lost") == 0

        # The old values run on: the same leader lock, still taken by us.
        holder = await world.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'tokend-leader'"
        )
        assert holder == 1
        # At the new level an info line is no longer written.
        scheduled = len(process.said("refresh scheduled"))
        assert scheduled == 3  # the backfill at the start of the term
        await world.notify("refreshed", keys[0])

        async def rescheduled() -> bool:
            lifecycle = await world.lifecycle(keys[0]) or {}
            return lifecycle.get("lastScheduleSource") == "lazy_refresh_success"

        await eventually(rescheduled)
        assert len(process.said("refresh scheduled")) == scheduled
    finally:
        process.stop()

    restart = process.said("config changes need a restart; the running values stay")
    assert restart and sorted(restart[0]["keys"]) == [
        "database.dsn",
        "http.listen",
        "leader.lock_name",
    ]
    assert "elsewhere" not in process.log_path.read_text()
    assert process.said("deadlines recomputed")


async def _deadlines(process: Process) -> dict[IntegrationKey, float]:
    from uuid import UUID

    _, status = await process.get("/status")
    return {
        IntegrationKey(UUID(n["tenant"]), UUID(n["integration_id"])): parse_iso(
            n["due"], "due"
        )
        or 0.0
        for n in status["next"]
    }


async def test_an_invalid_reload_keeps_the_running_config_and_counts_a_failure(
    world: World, tmp_path: Path
) -> None:
    process, doc = _process(tmp_path, world.dsn, "bad", scheduler={"buffer_s": 600})
    process.start()
    try:
        await _leading(process)
        key = await world.connect()
        await eventually(lambda: process.said("refresh scheduled"))
        before = await _deadlines(process)

        doc["scheduler"]["buffer_s"] = 1800.0
        doc["scheduler"]["concurrency"] = 0
        doc["scheduler"]["spread"] = 5
        write_config(process.config_path, doc)
        process.signal(signal.SIGHUP)
        await eventually(
            lambda: process.said("config reload rejected; the running config stays")
        )

        _, text = await process.get("/metrics")
        samples = _samples(text)
        assert _value(samples, "tokend_config_reloads_total", result="failure") == 1
        assert _value(samples, "tokend_config_reloads_total", result="success") == 0
        _, status = await process.get("/status")
        assert status["role"] == "leader"
        assert status["last_reload"]["result"] == "failure"
        errors = status["last_reload"]["errors"]
        assert any(e.startswith("scheduler.concurrency: ") for e in errors)
        assert any(e.startswith("scheduler.spread: unknown key") for e in errors)
        assert await _deadlines(process) == before

        # And the daemon goes on working under the old config.
        await world.notify("refresh_now", key)
        await eventually(lambda: process.said("refresh succeeded"))
    finally:
        process.stop()

    logged = process.said("config reload rejected; the running config stays")
    assert len(logged[0]["errors"]) == 2 and logged[0]["level"] == "error"


async def test_a_reload_with_client_credentials_revives_what_lacked_them(
    world: World, tmp_path: Path
) -> None:
    await world.conn.execute("DELETE FROM tokend_secrets WHERE tenant = $1", APP)
    process, doc = _process(tmp_path, world.dsn, "creds")
    process.start(env={"TOKEND_TEST_SECRET": CLIENT_SECRET})
    try:
        await _leading(process)
        key = await world.connect()

        async def failure_code() -> str | None:
            lifecycle = await world.lifecycle(key) or {}
            return (lifecycle.get("lastRefreshFailure") or {}).get("code")

        assert await eventually(failure_code) == "client_credentials_missing"

        doc["providers"]["ninjaone"]["client_id"] = CLIENT_ID
        doc["providers"]["ninjaone"]["client_secret_env"] = "TOKEND_TEST_SECRET"
        write_config(process.config_path, doc)
        process.signal(signal.SIGHUP)

        await eventually(lambda: process.said("refresh succeeded"), timeout_s=20)
        lifecycle = await world.lifecycle(key)
        assert lifecycle and lifecycle["status"] == "scheduled"
    finally:
        process.stop()
    assert CLIENT_SECRET not in process.log_path.read_text()


# -- SIGTERM -----------------------------------------------------------------


async def test_sigterm_finishes_a_slow_refresh_then_hands_over(
    world: World, tmp_path: Path
) -> None:
    first, _ = _process(tmp_path, world.dsn, "first")
    second, _ = _process(tmp_path, world.dsn, "second")
    first.start()
    try:
        await _leading(first)
        second.start()
        await eventually(lambda: second.said("ready"), timeout_s=20)
        world.endpoint.delay_s = 2.0
        key = await world.connect()
        sent = await world.credentials(key)
        await eventually(lambda: first.said("refresh started"), timeout_s=20)

        first.signal(signal.SIGTERM)
        assert await first.exited(20) == 0

        # Persisted before the exit: the rotated token and its lifecycle.
        assert len(world.refreshes()) == 1
        stored = await world.credentials(key)
        assert stored.refresh_token == world.refreshes()[0].new_refresh_token
        assert stored.refresh_token != sent.refresh_token
        lifecycle = await world.lifecycle(key)
        assert lifecycle and lifecycle["lastScheduleSource"] == (
            "proactive_refresh_success"
        )
        assert lifecycle["ownerId"] == "first"

        await eventually(lambda: second.said("leadership gained"), timeout_s=10)
        world.endpoint.delay_s = 0

        async def refreshed_by_second() -> bool:
            lifecycle = await world.lifecycle(key)
            return bool(lifecycle and lifecycle["ownerId"] == "second")

        await eventually(refreshed_by_second, timeout_s=20)
    finally:
        first.stop()
        second.stop()

    messages = [line["message"] for line in first.log_lines()]
    drain = messages.index("draining in-flight refreshes")
    assert messages.index("stopping") < drain < messages.index("refresh succeeded")
    assert messages.index("refresh succeeded") < messages.index("leadership released")
    assert messages[-1] == "stopped"


async def test_a_second_signal_exits_at_once(world: World, tmp_path: Path) -> None:
    process, _ = _process(
        tmp_path,
        world.dsn,
        "hasty",
        daemon={"shutdown_grace_s": 30},
        providers={"ninjaone": {"allow_http_loopback": True, "request_timeout_s": 30}},
    )
    # A token endpoint that takes the request and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()
        process.start()
        try:
            await _leading(process)
            await world.connect(instance_url=f"http://{host}:{port}")
            await eventually(lambda: process.said("refresh started"), timeout_s=20)

            process.signal(signal.SIGTERM)
            await eventually(lambda: process.said("draining in-flight refreshes"))
            process.signal(signal.SIGINT)
            # Far sooner than the 30 s of grace the refresh could take.
            assert await process.exited(5) == 1
        finally:
            process.stop()
    assert process.said("second stop signal: exiting at once")
    assert not process.said("stopped")


# -- sd_notify ---------------------------------------------------------------


class Systemd:
    """The receiving end of NOTIFY_SOCKET, standing in for systemd."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, prefix: str) -> list[int]:
        """Positions of the messages starting with `prefix`."""
        self.collect()
        return [i for i, m in enumerate(self.messages) if m.startswith(prefix)]


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    # AF_UNIX paths are limited to 108 bytes; tmp_path can be longer.
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        sock.setblocking(False)
        yield Systemd(sock, path)


async def test_systemd_hears_ready_status_watchdog_reload_and_stopping(
    world: World, tmp_path: Path, systemd: Systemd
) -> None:
    await world.connect(notify=False, expires_in_s=7200)
    process, _ = _process(tmp_path, world.dsn, "notified")
    process.start(env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "1000000"})
    try:
        await eventually(lambda: systemd.seen("READY=1"), timeout_s=20)
        await eventually(lambda: systemd.seen("STATUS=leader: 1 scheduled"))
        await eventually(lambda: len(systemd.seen("WATCHDOG=1")) >= 3, timeout_s=5)

        sent_at_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        process.signal(signal.SIGHUP)
        await eventually(lambda: len(systemd.seen("READY=1")) == 2)
        process.signal(signal.SIGTERM)
        assert await process.exited(15) == 0
    finally:
        process.stop()

    messages = systemd.collect()
    ready = systemd.seen("READY=1")
    reloading = systemd.seen("RELOADING=1")
    stopping = systemd.seen("STOPPING=1")
    assert len(reloading) == 1 and len(stopping) == 1
    assert ready[0] < reloading[0] < ready[1] < stopping[0]
    lines = dict(line.split("=", 1) for line in messages[reloading[0]].splitlines())
    assert lines.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert 0 <= int(lines["MONOTONIC_USEC"]) - sent_at_usec < 10_000_000
    status = [m for m in messages if m.startswith("STATUS=")]
    leading = [m for m in status if m.startswith("STATUS=leader: 1 scheduled")]
    assert "next deadline 20" in leading[0]
    assert messages[stopping[0] + 1] == "STATUS=stopping: finishing in-flight refreshes"
    # Pinged at half of WATCHDOG_USEC.
    (started,) = process.said("watchdog pings started")
    assert started["interval_s"] == 0.5
