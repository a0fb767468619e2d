"""The process around the daemon: logging, the event loop, signals, HTTP.

Signal handlers only set state; this module is their one owner. The first
SIGTERM or SIGINT drains and exits 0; a second exits at once. SIGHUP
reloads the config file, keeping the running one if the new one is bad.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

from tokend import config as config_module
from tokend import metrics, web
from tokend.config import Config
from tokend.daemon import Daemon
from tokend.errors import ConfigError, ConfigErrors
from tokend.logs import configure_logging, set_level

logger = logging.getLogger(__name__)


def run(
    config: Config, *, log_format: str | None = None, log_level: str | None = None
) -> int:
    configure_logging(log_level or config.log.level, log_format or config.log.format)
    return anyio.run(_main, config, backend_options={"use_uvloop": True})


async def _main(config: Config) -> int:
    daemon = Daemon(config)
    http = await web.serve(daemon, config.http.listen) if config.http.enabled else None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_signals, daemon)
            await daemon.run()
            tg.cancel_scope.cancel()
    finally:
        if http is not None:
            with anyio.CancelScope(shield=True):
                await http.cleanup()
    logger.info("stopped")
    return 0


async def _signals(daemon: Daemon) -> None:
    stopping = False
    with anyio.open_signal_receiver(
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP
    ) as received:
        async for signum in received:
            if signum == signal.SIGHUP:
                reload(daemon)
            elif stopping:
                logger.warning("second stop signal: exiting at once")
                os._exit(1)
            else:
                stopping = True
                logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                daemon.stop()


def reload(daemon: Daemon) -> bool:
    """Re-read the config file; keep the running config if it is invalid."""
    try:
        new = config_module.load(daemon.config.source)
        # The secret store checks what the file alone cannot (key material)
        # before anything of the new config applies.
        restart = [] if daemon.secrets is None else daemon.secrets.reload(new.secrets)
    except (ConfigErrors, ConfigError) as exc:
        errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
        metrics.config_reloads.labels("failure").inc()
        logger.error(
            "config reload rejected; keeping the running config",
            extra={"errors": [str(e) for e in errors]},
        )
        return False
    set_level(new.log.level)
    for key in restart:
        logger.warning(
            "setting changed; takes effect after a restart", extra={"key": key}
        )
    daemon.config = new
    metrics.config_reloads.labels("success").inc()
    logger.info("config reloaded", extra={"source": new.source})
    return True
