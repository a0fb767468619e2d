"""systemd's notification protocol (sd_notify), spoken without a dependency.

systemd passes the address of its notification socket in ``NOTIFY_SOCKET``; a
service of ``Type=notify`` sends it datagrams of newline-separated
``KEY=value`` assignments: READY=1 once it serves, STATUS=... for
``systemctl status``, RELOADING=1 and STOPPING=1 around reloads and shutdown,
and WATCHDOG=1 at least once per ``WatchdogSec``. Outside systemd (a terminal,
a container) the variable is unset and every method does nothing.

Notifications are a courtesy to the service manager: a failure to send one is
logged at debug level and never disturbs the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import anyio

__all__ = ["Notifier", "watchdog_loop"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; a no-op without ``NOTIFY_SOCKET``.

    ``environ`` defaults to ``os.environ`` and is read once, here.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self._address is not None

    def ready(self) -> None:
        """Startup (or a reload) is complete and the daemon serves."""
        self.notify("READY=1")

    def reloading(self) -> None:
        """A reload has begun; send ready() when it is done.

        systemd (``Type=notify-reload`` from v253) matches the reload by the
        CLOCK_MONOTONIC time at which it started.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line description of what the daemon is doing."""
        # A newline would end the assignment and start a bogus one.
        one_line = " ".join(text.split())
        self.notify(f"STATUS={one_line}")

    def watchdog(self) -> None:
        """Tell the watchdog the daemon is alive."""
        self.notify("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to ping the watchdog, or None when it is off.

        That is half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises,
        so one late ping is no missed deadline. The watchdog belongs to this
        process only if ``WATCHDOG_PID``, when set, is our own pid.
        """
        if self._address is None or not self._watchdog_usec:
            return None

        try:
            usec = int(self._watchdog_usec)
            pid = int(self._watchdog_pid) if self._watchdog_pid else os.getpid()
        except ValueError:
            logger.debug(
                "ignoring a malformed watchdog setting",
                extra={"watchdog_usec": self._watchdog_usec},
            )
            return None

        if usec <= 0 or pid != os.getpid():
            return None
        return usec / 2_000_000

    def notify(self, message: str) -> bool:
        """Send ``message`` as is; True if it went out, False otherwise."""
        if self._address is None:
            return False

        try:
            sock = self._socket()
            sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # A full queue (the socket does not block the event loop), a
            # vanished socket or a denied send all land here.
            logger.debug(
                "could not notify systemd",
                extra={"notify_message": message, "error": str(exc)},
            )
            return False
        return True

    def close(self) -> None:
        """Release the socket; later notifications open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sock = sock
        return self._sock


def _socket_address(value: str) -> str | None:
    """The AF_UNIX address of ``NOTIFY_SOCKET``, or None if unusable."""
    if value.startswith("@"):
        # An abstract socket: its name starts with a NUL byte, not a path.
        return "\0" + value[1:]

    if value.startswith("/"):
        return value

    if value:
        # Newer systemd can also pass vsock: addresses, which we do not speak.
        logger.debug("unsupported NOTIFY_SOCKET address", extra={"address": value})
    return None


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping the watchdog forever at half its interval; return if it is off.

    The pings come from the event loop itself, so a loop that hangs stops
    them and systemd restarts the daemon.
    """
    interval_s = notifier.watchdog_interval_s()
    if interval_s is None:
        return

    logger.debug("watchdog pings started", extra={"interval_s": interval_s})
    while True:
        notifier.watchdog()
        await anyio.sleep(interval_s)
