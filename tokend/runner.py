"""The process around the daemon: logging, the event loop, signals, HTTP and
systemd's notifications.

Signal handlers only set state; this module is their one owner. The first
SIGTERM or SIGINT drains and exits 0; a second exits at once. SIGHUP
reloads the config file, keeping the running one if the new one is bad.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import anyio
from aiohttp.web import AppRunner

from tokend import config as config_module
from tokend import metrics, web
from tokend.config import Config
from tokend.daemon import Daemon
from tokend.errors import ConfigError, ConfigErrors, UpstreamError, first_of
from tokend.logs import configure_logging
from tokend.sdnotify import Notifier, watchdog_loop

logger = logging.getLogger(__name__)

# Exit status after a second stop signal: the drain was cut short.
EXIT_INTERRUPTED = 1
# How often systemd's STATUS= line is brought up to date.
STATUS_EVERY_S = 1.0


@dataclass(frozen=True)
class Overrides:
    """Logging settings given on the command line or in the environment;
    they win over the config file, at start and on every reload."""

    log_format: str | None = None
    log_level: str | None = None


def run(config: Config, overrides: Overrides | None = None) -> int:
    overrides = overrides or Overrides()
    _configure_logging(config, overrides)
    return anyio.run(_main, config, overrides, backend_options={"use_uvloop": True})


def _configure_logging(config: Config, overrides: Overrides) -> None:
    configure_logging(
        overrides.log_level or config.log.level,
        overrides.log_format or config.log.format,
    )


class _Systemd(Notifier):
    """The notifier, remembering whether READY=1 went out: until it has,
    systemd is still starting the service and a reload is no news to it."""

    announced = False

    def ready(self) -> None:
        self.announced = True
        super().ready()


async def _main(config: Config, overrides: Overrides) -> int:
    daemon = Daemon(config)
    systemd = _Systemd()
    http = await _serve(daemon) if config.http.enabled else None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_signals, daemon, systemd, overrides)
            tg.start_soon(watchdog_loop, systemd)
            tg.start_soon(_report, daemon, systemd)
            await daemon.run()
            tg.cancel_scope.cancel()
    except* ConfigErrors as group:
        # Reported by the CLI as a configuration error (exit 2).
        raise first_of(group) from None
    finally:
        if http is not None:
            with anyio.CancelScope(shield=True):
                await http.cleanup()
        systemd.close()
    logger.info("stopped")
    return 0


async def _serve(daemon: Daemon) -> AppRunner:
    listen = daemon.config.http.listen
    try:
        return await web.serve(daemon, listen)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UpstreamError(f"cannot listen on {listen}: {reason}") from exc


async def _signals(daemon: Daemon, systemd: _Systemd, overrides: Overrides) -> None:
    stopping = False
    one_at_a_time = anyio.Lock()
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP
        ) as received:
            async for signum in received:
                if signum == signal.SIGHUP and not stopping:
                    tg.start_soon(_reload, daemon, systemd, overrides, one_at_a_time)
                elif signum == signal.SIGHUP:
                    logger.warning("reload ignored: stopping")
                elif stopping:
                    logger.warning("second stop signal: exiting at once")
                    os._exit(EXIT_INTERRUPTED)
                else:
                    stopping = True
                    name = signal.Signals(signum).name
                    logger.info("stopping", extra={"signal": name})
                    systemd.stopping()
                    systemd.status("stopping: finishing in-flight refreshes")
                    daemon.stop()


async def _reload(
    daemon: Daemon, systemd: _Systemd, overrides: Overrides, lock: anyio.Lock
) -> None:
    async with lock:
        announced = systemd.announced
        if announced:
            systemd.reloading()
        try:
            await reload(daemon, overrides)
        finally:
            if announced:
                systemd.ready()


async def reload(daemon: Daemon, overrides: Overrides | None = None) -> bool:
    """Re-read the config file; keep the running config if it is invalid."""
    overrides = overrides or Overrides()
    try:
        new = config_module.load(daemon.config.source)
        # The secret store checks what the file alone cannot (key material)
        # before anything of the new config applies; it reports the settings
        # it cannot change while running.
        store = daemon.secrets
        store_restart = [] if store is None else store.reload(new.secrets)
    except (ConfigErrors, ConfigError) as exc:
        found = exc.errors if isinstance(exc, ConfigErrors) else [exc]
        errors = [str(e) for e in found]
        daemon.reload_failed(errors)
        metrics.config_reloads.labels("failure").inc()
        logger.error(
            "config reload rejected; the running config stays",
            extra={"source": daemon.config.source, "errors": errors},
        )
        return False
    record = await daemon.reload(new, store_restart)
    metrics.config_reloads.labels("success").inc()
    # Said under the old level, so that raising it does not hide the reload.
    logger.info(
        "config reloaded",
        extra={
            "source": new.source,
            "changed": list(record.changed),
            "restart_needed": list(record.restart_needed),
        },
    )
    _configure_logging(daemon.config, overrides)
    return True


async def _report(daemon: Daemon, systemd: _Systemd) -> None:
    """READY=1 once connected, then a STATUS= line whenever it changes."""
    said = ""
    while not daemon.stopping:
        if not systemd.announced and daemon.ready():
            systemd.ready()
            logger.info("ready", extra={"role": daemon.leader.role})
        line = daemon.status_line()
        if line != said:
            systemd.status(line)
            said = line
        await anyio.sleep(STATUS_EVERY_S if systemd.announced else STATUS_EVERY_S / 4)
