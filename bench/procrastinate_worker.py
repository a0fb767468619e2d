"""The alternative: a procrastinate worker whose job is one refresh.

Each job refreshes one integration exactly as the limit loop does
(bench/limit_loop.py), so the difference from tokend is the job queue's:
polling, fetching, locking and finishing jobs. procrastinate's defaults,
but for the concurrency (--concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import procrastinate

from bench.limit_loop import MinimalRefresh

TASK = "refresh"


class _Worker:
    refresh: MinimalRefresh | None = None


def make_app(dsn: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name=TASK)
    async def refresh(tenant: str, integration: str) -> None:
        assert _Worker.refresh is not None
        await _Worker.refresh(uuid.UUID(tenant), uuid.UUID(integration))

    return app


async def main(dsn: str, concurrency: int) -> None:
    _Worker.refresh = await MinimalRefresh.open(dsn, concurrency)
    app = make_app(dsn)
    try:
        async with app.open_async():
            await app.run_worker_async(concurrency=concurrency)
    finally:
        await _Worker.refresh.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.dsn, args.concurrency))
