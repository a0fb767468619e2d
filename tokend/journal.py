"""The write-ahead journal: each provider answer on local disk before anything
else, so a rotated token set survives a crash before it reaches Postgres.

A token endpoint that rotates refresh tokens invalidates the one tokend sent
the moment it answers; from then on the answer is the only copy of a token
that works. The refresher appends it here (sealed with the secret-store key,
AES-256-GCM, then fsynced) before it writes anything to the database, and
marks it done once the database transaction that stores it has committed.
Whatever is not done is *pending*: kept in memory, retried, written back as
the spool at shutdown, and replayed at the next start with a compare-and-set
on the refresh token that was sent.

The file is `<state_dir>/journal`: a magic line, then frames of
`u32 length | u8 key-id length | key id | 12-byte nonce | sealed record`.
Each append is written and fdatasynced before it returns (see `append`).
`<state_dir>/lock` is held with flock for the life of the process: two
processes never share a journal.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tokend import metrics
from tokend.config import Config
from tokend.errors import (
    ConfigError,
    ConfigErrors,
    JournalError,
    SecretError,
    SecretUnavailable,
)
from tokend.secrets import APP
from tokend.secrets.cipher import Cipher, decode_key
from tokend.store import IntegrationKey

logger = logging.getLogger(__name__)

MAGIC = b"tokend-journal 1\n"
# The additional data every frame is sealed with: a record lifted into another
# secret-store row does not open there, nor one of those here.
_AAD_NAME = "tokend.journal"
_LENGTH = struct.Struct(">I")
_NONCE_BYTES = 12
# A frame longer than this is not one tokend wrote: the file is damaged.
_MAX_FRAME = 1 << 20
# Past this size the file is rewritten with only the pending records.
COMPACT_BYTES = 4 << 20
# Buffered "done" records are written out at this many even with no append.
_DONE_BATCH = 256


@dataclass(frozen=True)
class Entry:
    """One provider answer: the rotated credentials, and the refresh token
    that was sent for them (the compare-and-set condition of a replay)."""

    key: IntegrationKey
    provider: str
    secret_name: str
    sent_refresh_token: str
    credentials: bytes
    received_at: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __repr__(self) -> str:
        return f"Entry(id={self.id!r}, key={self.key!r}, <tokens hidden>)"

    def to_record(self) -> dict[str, Any]:
        return {
            "op": "answer",
            "id": self.id,
            "tenant": str(self.key.tenant),
            "integration_id": str(self.key.integration_id),
            "provider": self.provider,
            "secret": self.secret_name,
            "sent": self.sent_refresh_token,
            "credentials": self.credentials.decode(),
            "received_at": self.received_at,
        }

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> Entry:
        key = IntegrationKey(uuid.UUID(doc["tenant"]), uuid.UUID(doc["integration_id"]))
        return cls(
            key=key,
            provider=str(doc["provider"]),
            secret_name=str(doc["secret"]),
            sent_refresh_token=str(doc["sent"]),
            credentials=str(doc["credentials"]).encode(),
            received_at=float(doc["received_at"]),
            id=str(doc["id"]),
        )


def journal_cipher(config: Config) -> Cipher:
    """The journal's own key if set, else the Postgres store's keyring (so a
    journal written before a key rotation still opens)."""
    key = config.daemon.journal_key
    if key is None and config.secrets.key is None:
        # Only `tokend run` writes a journal, so only it asks for a key.
        problem = (
            "required when secrets.key is not set (or journal_key_env, "
            "journal_key_file): the journal of provider answers is encrypted"
        )
        raise ConfigErrors([ConfigError("daemon.journal_key", problem)])
    try:
        if key is not None:
            material = decode_key(key, "journal", "daemon.journal_key")
            return Cipher({"journal": material}, "journal")
        return Cipher.from_config(config.secrets)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str], cipher: Cipher) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "journal"
        self.cipher = cipher
        self.pending: dict[str, Entry] = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        # "done" records not yet written: they ride along with the next append.
        self._done: list[bytes] = []

    # -- opening and replay -------------------------------------------------

    def open(self) -> list[Entry]:
        """Take the state dir, read the journal, return its pending entries.

        The file is then rewritten with only those, so each start begins
        with a compact journal. Raises ConfigErrors when the state dir cannot
        be used, naming it and why.
        """
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            problem = f"cannot use {self.dir}: {exc.strerror}"
            raise ConfigErrors([ConfigError("daemon.state_dir", problem)]) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            problem = f"{self.dir} is in use by another tokend process"
            raise ConfigErrors([ConfigError("daemon.state_dir", problem)]) from None
        if self.path.exists():
            self.pending = self._read()
        self._rewrite(list(self.pending.values()))
        metrics.journal_pending.set(len(self.pending))
        if self.pending:
            logger.warning(
                "journal holds provider answers not yet stored; replaying",
                extra={"pending": len(self.pending), "path": str(self.path)},
            )
        return list(self.pending.values())

    def _read(self) -> dict[str, Entry]:
        data = self.path.read_bytes()
        if not data.startswith(MAGIC):
            self._set_aside("it does not start with the journal header")
            return {}
        answers: dict[str, Entry] = {}
        done: set[str] = set()
        try:
            for doc in self._records(data):
                if doc.get("op") == "done":
                    done.add(str(doc["id"]))
                else:
                    entry = Entry.from_record(doc)
                    answers[entry.id] = entry
        except (SecretError, SecretUnavailable, KeyError, TypeError, ValueError) as exc:
            # Keep what was readable before the damage, and the file itself
            # for an operator (a key that was rotated away, say).
            self._set_aside(str(exc))
        return {i: e for i, e in answers.items() if i not in done}

    def _records(self, data: bytes) -> Iterator[dict[str, Any]]:
        offset = len(MAGIC)
        while offset < len(data):
            if offset + _LENGTH.size > len(data):
                break
            (length,) = _LENGTH.unpack_from(data, offset)
            end = offset + _LENGTH.size + length
            if length > _MAX_FRAME:
                raise ValueError(f"frame at byte {offset} claims {length} bytes")
            if end > len(data):
                # A torn tail: an append that never reported durable.
                logger.warning(
                    "journal ends in a partial frame; ignoring it",
                    extra={"path": str(self.path), "offset": offset},
                )
                break
            yield self._open_frame(data[offset + _LENGTH.size : end])
            offset = end

    def _open_frame(self, frame: bytes) -> dict[str, Any]:
        id_len = frame[0]
        key_id = frame[1 : 1 + id_len].decode(errors="replace")
        nonce = frame[1 + id_len : 1 + id_len + _NONCE_BYTES]
        sealed = frame[1 + id_len + _NONCE_BYTES :]
        plain = self.cipher.decrypt(APP, _AAD_NAME, key_id, nonce, sealed)
        doc = orjson.loads(plain)
        if not isinstance(doc, dict):
            raise ValueError("a record is not a JSON object")
        return dict(doc)

    def _set_aside(self, problem: str) -> None:
        aside = self.path.with_name(f"journal.unreadable-{time.time_ns()}")
        os.replace(self.path, aside)
        logger.error(
            "journal unreadable; kept aside for an operator",
            extra={"problem": problem[:300], "kept_as": str(aside)},
        )

    # -- appending ----------------------------------------------------------

    def _seal(self, record: dict[str, Any]) -> bytes:
        key_id, nonce, sealed = self.cipher.encrypt(
            APP, _AAD_NAME, orjson.dumps(record)
        )
        ident = key_id.encode()
        body = bytes([len(ident)]) + ident + nonce + sealed
        return _LENGTH.pack(len(body)) + body

    def append(self, entry: Entry) -> None:
        """Return once `entry` is on disk: written and fsynced, here and now.

        The write is synchronous on purpose. Handing it to a thread or a
        writer task would leave the answer in memory for as long as the
        event loop takes to come round to it (milliseconds, tens of them
        on a busy host), and that is the window in which a crash loses a
        rotated token. An fdatasync of a few hundred bytes blocks the loop
        for a fraction of a millisecond on a healthy disk.

        The entry is pending from the moment this is called, so even when
        the disk fails (JournalError) it stays in memory for retries.
        """
        if self._fd is None:
            raise JournalError("the journal is not open")
        self.pending[entry.id] = entry
        metrics.journal_pending.set(len(self.pending))
        frames, self._done = self._done, []
        frames.append(self._seal(entry.to_record()))
        try:
            self._write(b"".join(frames))
            os.fdatasync(self._fd)
        except OSError as exc:
            logger.error(
                "journal write failed",
                extra={"path": str(self.path), "error": exc.strerror},
            )
            raise JournalError(
                f"cannot write the journal {self.path}: {exc.strerror}"
            ) from None

    def done(self, entry_id: str) -> None:
        """The entry is stored in the database (or superseded): not pending.

        Its record goes out with the next append, without an fsync of its
        own: losing it costs only a replay that the compare-and-set turns
        into a no-op. Once nothing is pending the file is emptied.
        """
        if self.pending.pop(entry_id, None) is None:
            return
        metrics.journal_pending.set(len(self.pending))
        try:
            if not self.pending:
                self._truncate()
            elif self._size > COMPACT_BYTES:
                # Off the answer's path: a done comes after the database write.
                self._done.clear()
                self._rewrite(list(self.pending.values()))
            else:
                self._done.append(self._seal({"op": "done", "id": entry_id}))
                if len(self._done) >= _DONE_BATCH:
                    frames, self._done = self._done, []
                    self._write(b"".join(frames))
        except OSError as exc:
            logger.error(
                "journal write failed",
                extra={"path": str(self.path), "error": exc.strerror},
            )

    def pending_for(self, key: IntegrationKey) -> Entry | None:
        for entry in self.pending.values():
            if entry.key == key:
                return entry
        return None

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def _truncate(self) -> None:
        """Empty the file. No fsync: should a crash undo it, the records
        replay as no-ops."""
        self._done.clear()
        if self._size > len(MAGIC):
            assert self._fd is not None
            os.ftruncate(self._fd, len(MAGIC))
            self._size = len(MAGIC)

    def _rewrite(self, entries: list[Entry]) -> None:
        """Replace the file with one holding `entries` (temp, fsync, rename)."""
        temp = self.path.with_name("journal.tmp")
        data = MAGIC + b"".join(self._seal(e.to_record()) for e in entries)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        _fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Write the spool: the file keeps exactly the pending entries."""
        if self._lock_fd is None:
            return
        try:
            if self._fd is not None:
                self._rewrite(list(self.pending.values()))
                os.close(self._fd)
                self._fd = None
            if self.pending:
                logger.warning(
                    "provider answers not yet stored are spooled for the next start",
                    extra={"pending": len(self.pending), "path": str(self.path)},
                )
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
