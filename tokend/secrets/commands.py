"""`tokend secrets put|get|rotate-key`: the operator's commands.

Values go in on standard input and come out only with `--reveal`; every
other output is metadata. Errors are one line, and never hold a value or
key material.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import UUID

import anyio
import asyncpg

from tokend.config import Config, load
from tokend.db import connect
from tokend.errors import DatabaseError
from tokend.lifecycle import iso
from tokend.secrets import APP, MAX_VALUE_BYTES, SecretStore, open_store
from tokend.secrets.cipher import Cipher
from tokend.secrets.postgres import rotate

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Action = Callable[[Config, argparse.Namespace], Awaitable[int]]


def run(args: argparse.Namespace) -> int:
    config = load(args.config)
    action: Action = _ACTIONS[args.action]
    return anyio.run(action, config, args)


def _who(tenant: UUID) -> str:
    return "the app" if tenant == APP else f"tenant {tenant}"


async def _connect(config: Config) -> asyncpg.Connection:
    return await connect(config, "tokend secrets")


@asynccontextmanager
async def _opened(config: Config) -> AsyncIterator[SecretStore]:
    """The configured store; only the Postgres store needs the database."""
    conn = await _connect(config) if config.secrets.backend == "postgres" else None
    store = open_store(config, conn)
    try:
        yield store
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"the database refused: {exc}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
            if conn is not None:
                await conn.close(timeout=5)


async def _put(config: Config, args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read(MAX_VALUE_BYTES + 3)
    # `echo value | tokend secrets put` must not store the echo's newline.
    value = value.removesuffix(b"\n").removesuffix(b"\r")
    if not value:
        print("tokend: no value on standard input", file=sys.stderr)
        return EXIT_USAGE
    if len(value) > MAX_VALUE_BYTES:
        print(f"tokend: value is over {MAX_VALUE_BYTES} bytes", file=sys.stderr)
        return EXIT_USAGE
    async with _opened(config) as store:
        await store.put(args.tenant, args.name, value)
    print(f"stored {args.name!r} for {_who(args.tenant)} ({len(value)} bytes)")
    return EXIT_OK


async def _get(config: Config, args: argparse.Namespace) -> int:
    async with _opened(config) as store:
        if args.reveal:
            found = await store.get_many([(args.tenant, args.name)])
            value = found.get((args.tenant, args.name))
            info = None
        else:
            info = await store.describe(args.tenant, args.name)
            value = None
    if value is None and info is None:
        print(
            f"tokend: no secret {args.name!r} for {_who(args.tenant)}", file=sys.stderr
        )
        return EXIT_FAILURE
    if value is not None:
        sys.stdout.buffer.write(value)
        sys.stdout.flush()
        return EXIT_OK
    assert info is not None
    lines = {
        "tenant": "app" if args.tenant == APP else str(args.tenant),
        "name": args.name,
        "backend": config.secrets.backend,
        "size": f"{info.size} bytes",
        "updated_at": iso(info.updated_at) or "unknown",
        **info.details,
    }
    for key, text in lines.items():
        print(f"{key}: {text}")
    return EXIT_OK


async def _rotate_key(config: Config, args: argparse.Namespace) -> int:
    if config.secrets.backend != "postgres":
        print(
            "tokend: rotate-key re-encrypts the postgres store; backend is "
            f"{config.secrets.backend}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.batch < 1 or args.wait < 0:
        print("tokend: --batch must be >= 1 and --wait >= 0", file=sys.stderr)
        return EXIT_USAGE
    cipher = Cipher.from_config(config.secrets)
    conn = await _connect(config)
    try:
        report = await rotate(conn, cipher, batch=args.batch, wait_s=args.wait)
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"rotation stopped: {exc}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close(timeout=5)
    print(
        f"re-encrypted {report.rotated} secrets with key {report.key_id!r} "
        f"in {report.batches} batches"
    )
    for reason, count in sorted(report.unopened_by_code().items()):
        print(f"tokend: {count} secrets did not open: {reason}", file=sys.stderr)
    if report.left > 0:
        print(
            f"tokend: {report.left} secrets are still sealed with another key "
            "(locked, or written meanwhile by a daemon that was not reloaded); "
            "run again",
            file=sys.stderr,
        )
    return EXIT_FAILURE if report.unopened or report.left > 0 else EXIT_OK


_ACTIONS: dict[str, Action] = {
    "put": _put,
    "get": _get,
    "rotate-key": _rotate_key,
}
