"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tokend.sdnotify import Notifier, watchdog_loop

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="AF_UNIX sockets are not available here"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Systemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def receive(self, timeout_s: float = 2.0) -> str:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    # A short directory of our own: AF_UNIX paths are limited to 108 bytes,
    # which pytest's tmp_path can exceed.
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        yield Systemd(sock, path)


@pytest.fixture
def notifier(systemd: Systemd) -> Iterator[Notifier]:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.address})
    yield notifier
    notifier.close()


def test_ready_stopping_and_watchdog_send_their_assignment(
    notifier: Notifier, systemd: Systemd
) -> None:
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()

    assert [systemd.receive() for _ in range(3)] == [
        "READY=1",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_status_is_kept_to_one_line(notifier: Notifier, systemd: Systemd) -> None:
    notifier.status("leading\n42 integrations  scheduled")

    assert systemd.receive() == "STATUS=leading 42 integrations scheduled"


def test_reloading_carries_the_monotonic_time(
    notifier: Notifier, systemd: Systemd
) -> None:
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    reloading, monotonic = systemd.receive().split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(value) <= after_usec


def test_environment_is_read_by_default(
    systemd: Systemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)

    notifier = Notifier()
    try:
        notifier.ready()
    finally:
        notifier.close()

    assert systemd.receive() == "READY=1"


def test_abstract_socket_address() -> None:
    name = f"tokend-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            notifier.ready()
        finally:
            notifier.close()

        sock.settimeout(2.0)
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path"])
def test_without_a_usable_socket_everything_is_a_no_op(value: str | None) -> None:
    notifier = Notifier({} if value is None else {"NOTIFY_SOCKET": value})

    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready()
    notifier.reloading()
    notifier.status("idle")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_send_errors_are_logged_at_debug_and_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokend.sdnotify")
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        notifier = Notifier({"NOTIFY_SOCKET": str(Path(directory) / "gone")})
        try:
            assert notifier.notify("READY=1") is False
            notifier.ready()
        finally:
            notifier.close()

    failures = [
        r for r in caplog.records if r.getMessage() == "could not notify systemd"
    ]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})

    assert notifier.watchdog_interval_s() == expected


def test_no_watchdog_without_a_notify_socket() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() is None


@pytest.mark.anyio
async def test_watchdog_loop_pings_at_half_the_interval(systemd: Systemd) -> None:
    # 40 ms of watchdog, so a ping every 20 ms.
    environ = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "40000"}
    notifier = Notifier(environ)
    try:
        with anyio.move_on_after(0.25):
            await watchdog_loop(notifier)
    finally:
        notifier.close()

    pings = systemd.pending()
    assert set(pings) == {"WATCHDOG=1"}
    # 0.25 s / 0.02 s gives 13 at most; a slow machine may fit fewer.
    assert 3 <= len(pings) <= 14


@pytest.mark.anyio
async def test_watchdog_loop_returns_when_the_watchdog_is_off() -> None:
    with anyio.fail_after(1):
        await watchdog_loop(Notifier({}))
