"""The files store: the host app's secrets folder, read and written in place.

Layout: app secrets at `<base>/<name>`, tenant secrets at
`<base>/tenants/<tenant>/<name>`, one file a secret holding the raw value.
Writes are atomic: a temporary file in the same folder, fsync, rename over
the old file, fsync of the folder; files are created 0600 and folders 0700.
Symbolic links inside the base are followed (a Kubernetes secret volume is
built of them), but no name or tenant can lead outside it.

File I/O blocks, so it runs in worker threads, at most `threads` at once,
each call bounded by `io_timeout_s`. A call that times out is abandoned:
its thread may still finish, so a timed-out write can land later.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import anyio
import anyio.to_thread

from tokend.config import FilesConfig, SecretsConfig
from tokend.db import Conn
from tokend.errors import SecretError, SecretUnavailable
from tokend.secrets import APP, SecretInfo, SecretKey, check_name, check_value

logger = logging.getLogger(__name__)

T = TypeVar("T")

TENANTS = "tenants"

# Failures an operator fixes on the host (permissions, a full or read-only
# disk, a flaky mount): the integration waits and heals once fixed.
_HOST_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
    }
)


class FileSecretStore:
    backend = "files"

    def __init__(self, config: FilesConfig) -> None:
        self.base = Path(config.base)
        self.config = config
        self._limiter = anyio.CapacityLimiter(config.threads)

    # -- paths --------------------------------------------------------------

    def path(self, tenant: UUID, name: str) -> Path:
        """Where a secret lives; refuses anything that would leave the base."""
        check_name(name)
        if tenant == APP:
            if name == TENANTS:
                raise SecretError(f"secret name {name!r} is the tenants folder")
            return self.base / name
        # str(UUID) is always 36 characters of hex and dashes.
        return self.base / TENANTS / str(tenant) / name

    # -- the store ----------------------------------------------------------

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]:
        wanted = [(key, self.path(*key)) for key in keys]

        def read_all() -> dict[SecretKey, bytes]:
            self._check_base()
            found = {}
            for key, path in wanted:
                value = self._read(path)
                if value is not None:
                    found[key] = value
            return found

        return await self._run(read_all, "read")

    async def put(
        self,
        tenant: UUID,
        name: str,
        value: bytes,
        *,
        conn: Conn | None = None,
    ) -> None:
        path = self.path(tenant, name)
        check_value(value)
        await self._run(lambda: self._write(path, value), "write")

    async def describe(self, tenant: UUID, name: str) -> SecretInfo | None:
        path = self.path(tenant, name)

        def look() -> SecretInfo | None:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._error(path, exc) from None
            mode = stat.filemode(info.st_mode)
            return SecretInfo(
                info.st_size, info.st_mtime, {"path": str(path), "mode": mode}
            )

        return await self._run(look, "stat")

    def reload(self, config: SecretsConfig) -> list[str]:
        if config.backend != self.backend:
            return ["secrets.backend"]
        restart = ["secrets.files.base"] if config.files.base != str(self.base) else []
        self.config = dataclasses.replace(config.files, base=str(self.base))
        self._limiter.total_tokens = config.files.threads
        return restart

    async def aclose(self) -> None:
        """Nothing is held open between calls."""

    # -- blocking parts, run in worker threads ------------------------------

    async def _run(self, work: Callable[[], T], what: str) -> T:
        try:
            with anyio.fail_after(self.config.io_timeout_s):
                return await anyio.to_thread.run_sync(
                    work, abandon_on_cancel=True, limiter=self._limiter
                )
        except TimeoutError:
            raise SecretUnavailable(
                f"secret {what} under {self.base} took over "
                f"{self.config.io_timeout_s:g} s",
                code="secret_store_timeout",
            ) from None

    def _read(self, path: Path) -> bytes | None:
        # O_NONBLOCK: a FIFO planted at the path must not hang the thread.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(path, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SecretError(f"secret file {path} is not a regular file")
        with os.fdopen(fd, "rb") as handle:
            try:
                value = handle.read(self.config.max_bytes + 1)
            except OSError as exc:
                raise self._error(path, exc) from None
        if len(value) > self.config.max_bytes:
            raise SecretError(
                f"secret file {path} is over {self.config.max_bytes} bytes "
                "(secrets.files.max_bytes)"
            )
        return value

    def _check_base(self) -> None:
        # An unmounted or mistyped base would read as "no secrets" for every
        # tenant: say so instead, and let the integrations wait.
        if not self.base.is_dir():
            raise SecretUnavailable(
                f"secrets folder {self.base} does not exist or is not a folder",
                code="secret_store_unreadable",
            )

    def _write(self, path: Path, value: bytes) -> None:
        self._check_base()
        folder = path.parent
        try:
            made = self._make_folders(folder)
            fd, temp = tempfile.mkstemp(
                dir=folder, prefix=f".{path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise self._error(folder, exc) from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except OSError as exc:
            _remove(temp)
            raise self._error(path, exc) from None
        except BaseException:
            _remove(temp)
            raise
        try:
            for synced in [folder, *made]:
                _fsync_folder(synced)
        except OSError as exc:
            raise self._error(folder, exc) from None

    def _make_folders(self, folder: Path) -> list[Path]:
        """Create the tenant's folders 0700; return the parents whose
        entries changed, so they are fsynced too."""
        changed: list[Path] = []
        missing = []
        current = folder
        while current != self.base and not current.exists():
            missing.append(current)
            current = current.parent
        for created in reversed(missing):
            try:
                os.mkdir(created, 0o700)
            except FileExistsError:
                continue
            changed.append(created.parent)
        return changed

    def _error(self, path: Path, exc: OSError) -> SecretError | SecretUnavailable:
        reason = exc.strerror or type(exc).__name__
        message = f"cannot use secret file {path}: {reason}"
        if exc.errno in _HOST_ERRNOS:
            return SecretUnavailable(message, code="secret_store_unreadable")
        return SecretError(message)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        logger.warning("temporary secret file left behind", extra={"path": path})
