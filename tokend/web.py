"""HTTP for operators: /metrics, /healthz, /readyz, /status."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokend.metrics import REGISTRY

if TYPE_CHECKING:
    from tokend.daemon import Daemon

logger = logging.getLogger(__name__)


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json"
    )


def application(daemon: Daemon) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop runs.
        return _json({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        # Ready: connected to Postgres and leading or following. A follower is
        # ready too: it takes over the moment the leader goes.
        ready = daemon.ready()
        doc = {"ready": ready, "role": daemon.leader.role}
        return _json(doc, 200 if ready else 503)

    async def status(_: web.Request) -> web.Response:
        return _json(daemon.status())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    return app


async def serve(daemon: Daemon, listen: str) -> web.AppRunner:
    """Start the HTTP server; the caller cleans the runner up."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(application(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    logger.info("http listening", extra={"listen": listen})
    return runner
