"""The `tokend` command. Exit codes: 0 ok, 2 usage or config error, 1 runtime
failure; errors are one line naming the problem."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tokend.errors import ConfigError, ConfigErrors, SecretError, TokendError
from tokend.secrets import APP, check_name

if TYPE_CHECKING:
    from tokend.store import IntegrationKey

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _UsageError(TokendError):
    """The command line asks for something impossible (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"tokend: {message}\n")


# Options the environment may give when the command line does not, one table
# for every command: variable and allowed values (None: any).
ENV_OPTIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "config": ("TOKEND_CONFIG", None),
    "log_format": ("TOKEND_LOG_FORMAT", ("auto", "json", "text")),
    "log_level": ("TOKEND_LOG_LEVEL", ("debug", "info", "warning", "error")),
}
NOTIFY_EVENTS = ("connected", "disconnected", "refreshed", "reset", "refresh_now")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="TOML config file (TOKEND_CONFIG)")


def _from_env(args: argparse.Namespace) -> str | None:
    """Fill options the command line left out from the environment; a usage
    error naming the variable if its value is not allowed."""
    for dest, (variable, allowed) in ENV_OPTIONS.items():
        if getattr(args, dest, "") is not None or variable not in os.environ:
            continue
        value = os.environ[variable]
        if allowed is not None and value not in allowed:
            return f"{variable}: expected one of {', '.join(allowed)}, got {value!r}"
        setattr(args, dest, value)
    if getattr(args, "config", "") is None:
        return "--config is required (or set TOKEND_CONFIG)"
    return None


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uuid: {text!r}") from None


def _integration_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--tenant", type=_uuid, required=required, metavar="UUID")
    parser.add_argument("--integration", type=_uuid, required=required, metavar="UUID")


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    """An argparse type: a finite number from `low` to `high`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"expected {low:g} to {high:g}, got {text}"
            )
        return value

    return parse


def _wait_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=_bounded(float, 0, 3600),
        default=15.0,
        metavar="S",
        help="seconds to wait for the leader to act (0: only send)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokend", description="Keeps OAuth2 tokens fresh.")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    run = commands.add_parser("run", help="run the daemon")
    _config_arg(run)
    run.add_argument("--log-format", choices=["auto", "json", "text"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    migrate = commands.add_parser("migrate", help="create or update the schema")
    _config_arg(migrate)
    migrate.add_argument(
        "--host-table",
        action="store_true",
        help="also create a host-compatible rmm_integrations table",
    )
    migrate.add_argument(
        "--trigger",
        action="store_true",
        help="notify tokend when rmm_integrations.is_active changes",
    )

    status = commands.add_parser(
        "status", help="integrations by status, next deadlines, what needs a human"
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--limit", type=_bounded(int, 1, 10_000), default=10, help="rows per list"
    )

    notify = commands.add_parser("notify", help="send the leader a notification")
    _config_arg(notify)
    notify.add_argument("event", choices=[*NOTIFY_EVENTS, "resync"])
    _integration_args(notify, required=False)

    reset = commands.add_parser("reset", help="clear reconnect-required")
    _config_arg(reset)
    _integration_args(reset)
    _wait_arg(reset)

    refresh = commands.add_parser(
        "refresh", help="refresh one integration now, bypassing backoff"
    )
    _config_arg(refresh)
    _integration_args(refresh)
    _wait_arg(refresh)
    _secrets_parser(commands.add_parser("secrets", help="put, get, rotate-key"))

    demo = commands.add_parser("demo", help="the main job on an embedded default")
    demo.add_argument("--integrations", type=_bounded(int, 1, 100_000), default=25)
    demo.add_argument(
        "--token-lifetime", type=_bounded(float, 10, 86_400), default=90.0
    )
    demo.add_argument(
        "--duration",
        type=_bounded(float, 1, 86_400),
        help="stop after this many seconds",
    )
    demo.add_argument("--json", action="store_true", help="print a summary object")
    return parser


def _tenant(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uuid: {text!r}") from None


def _secret_name(text: str) -> str:
    try:
        return check_name(text)
    except SecretError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _secrets_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    put = actions.add_parser("put", help="store the value read from standard input")
    get = actions.add_parser("get", help="show a secret's metadata")
    for sub in (put, get):
        _config_arg(sub)
        sub.add_argument(
            "--tenant", type=_tenant, default=APP, help="tenant uuid (default: app)"
        )
        sub.add_argument("name", type=_secret_name)
    get.add_argument("--reveal", action="store_true", help="print the value itself")
    rotate = actions.add_parser(
        "rotate-key", help="re-encrypt the postgres store with the current key"
    )
    _config_arg(rotate)
    rotate.add_argument(
        "--batch",
        type=_bounded(int, 1, 100_000),
        default=500,
        help="rows a transaction",
    )
    rotate.add_argument(
        "--wait",
        type=_bounded(float, 0, 3600),
        default=10.0,
        help="seconds to retry locked rows",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _from_env(args)
    if problem is not None:
        parser.error(problem)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "check-config": _check_config,
        "migrate": _migrate,
        "status": _status,
        "notify": _notify,
        "reset": _reset,
        "refresh": _refresh,
        "secrets": _secrets,
        "demo": _demo,
    }
    try:
        code = handlers[args.command](args)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"tokend: config: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except (_UsageError, ConfigError) as exc:
        print(f"tokend: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except TokendError as exc:
        print(f"tokend: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    sys.exit(code)


def _check_config(args: argparse.Namespace) -> int:
    from tokend import config

    loaded = config.load(args.file)
    print(f"{args.file}: ok ({len(loaded.providers)} providers)")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from tokend import config, runner

    loaded = config.load(args.config)
    overrides = runner.Overrides(args.log_format, args.log_level)
    return runner.run(loaded, overrides)


def _status(args: argparse.Namespace) -> int:
    import anyio
    import orjson

    from tokend import admin, config

    if args.limit < 1:
        raise _UsageError("--limit must be at least 1")
    doc = anyio.run(admin.status, config.load(args.config), args.limit)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print(admin.render_status(doc))
    return EXIT_OK


def _key(args: argparse.Namespace) -> IntegrationKey | None:
    from tokend.store import IntegrationKey

    if args.tenant is None and args.integration is None:
        return None
    if args.tenant is None or args.integration is None:
        raise _UsageError("give both --tenant and --integration")
    return IntegrationKey(args.tenant, args.integration)


def _notify(args: argparse.Namespace) -> int:
    import anyio

    from tokend import admin, config

    key = _key(args)
    if (key is None) != (args.event == "resync"):
        raise _UsageError(
            "resync takes no integration"
            if key
            else f"{args.event} needs --tenant and --integration"
        )
    print(anyio.run(admin.notify, config.load(args.config), args.event, key))
    return EXIT_OK


def _reset(args: argparse.Namespace) -> int:
    import anyio

    from tokend import admin, config

    key = _key(args)
    assert key is not None  # both options are required
    print(anyio.run(admin.reset, config.load(args.config), key, args.wait))
    return EXIT_OK


def _refresh(args: argparse.Namespace) -> int:
    import anyio

    from tokend import admin, config

    key = _key(args)
    assert key is not None  # both options are required
    print(anyio.run(admin.refresh, config.load(args.config), key, args.wait))
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    import anyio
    import asyncpg

    from tokend import config
    from tokend.db import connect
    from tokend.errors import DatabaseError
    from tokend.migrate import migrate

    loaded = config.load(args.config)

    async def apply() -> list[str]:
        conn = await connect(loaded, "tokend migrate")
        try:
            return await migrate(
                conn,
                host_table=args.host_table,
                trigger=args.trigger,
                channel=loaded.notify.channel,
            )
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"migration failed: {exc}") from exc
        finally:
            await conn.close()

    applied = anyio.run(apply)
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return EXIT_OK


def _secrets(args: argparse.Namespace) -> int:
    from tokend.secrets import commands

    return commands.run(args)


def _demo(args: argparse.Namespace) -> int:
    from tokend import demo

    return demo.run(
        integrations=args.integrations,
        token_lifetime_s=args.token_lifetime,
        duration_s=args.duration,
        as_json=args.json,
    )
