"""The `tokend` command. Exit codes: 0 ok, 2 usage or config error, 1 runtime
failure; errors are one line naming the problem."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from uuid import UUID

from tokend.errors import ConfigErrors, SecretError, TokendError
from tokend.secrets import APP, check_name

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"tokend: {message}\n")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="TOML config file")


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

    _secrets_parser(commands.add_parser("secrets", help="put, get, rotate-key"))

    demo = commands.add_parser("demo", help="the main job on an embedded default")
    demo.add_argument("--integrations", type=int, default=25)
    demo.add_argument("--token-lifetime", type=float, default=90.0)
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
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
    rotate.add_argument("--batch", type=int, default=500, help="rows a transaction")
    rotate.add_argument(
        "--wait", type=float, default=10.0, help="seconds to retry locked rows"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "check-config": _check_config,
        "migrate": _migrate,
        "secrets": _secrets,
        "demo": _demo,
    }
    try:
        code = handlers[args.command](args)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"tokend: config: {error}", file=sys.stderr)
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
    return runner.run(loaded, log_format=args.log_format, log_level=args.log_level)


def _migrate(args: argparse.Namespace) -> int:
    import anyio
    import asyncpg

    from tokend import config
    from tokend.errors import DatabaseError
    from tokend.migrate import migrate

    loaded = config.load(args.config)

    async def apply() -> list[str]:
        try:
            conn = await asyncpg.connect(
                loaded.database.dsn, timeout=loaded.database.connect_timeout_s
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseError(f"cannot connect to the database: {exc}") from exc
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

    if args.integrations < 1 or args.token_lifetime < 10:
        print(
            "tokend: --integrations must be >= 1 and --token-lifetime >= 10",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return demo.run(
        integrations=args.integrations,
        token_lifetime_s=args.token_lifetime,
        duration_s=args.duration,
        as_json=args.json,
    )
