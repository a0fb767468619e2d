"""The write-ahead journal on its own: sealed, durable before append returns,
replayed after a crash, compacted, and never shared by two processes."""

from __future__ import annotations

import base64
import errno
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import config_doc
from tokend import journal as journal_module
from tokend.config import parse
from tokend.errors import ConfigErrors, JournalError
from tokend.journal import MAGIC, Entry, Journal, journal_cipher
from tokend.secrets.cipher import Cipher
from tokend.store import IntegrationKey

KEY = b"j" * 32


def _cipher(key: bytes = KEY, key_id: str = "k1") -> Cipher:
    return Cipher({key_id: key}, key_id)


def _entry(n: int = 0) -> Entry:
    return Entry(
        key=IntegrationKey(uuid.uuid4(), uuid.uuid4()),
        provider="ninjaone",
        secret_name="ninjaone_credentials",
        sent_refresh_token=f"rt_sent_{n}_" + "x" * 20,
        credentials=(
            f'{{"access_token": "at_new_{n}", "refresh_token": "rt_new_{n}_zzz",'
            ' "expires_at": 1}'
        ).encode(),
        received_at=1000.0 + n,
    )


def _crash(journal: Journal) -> None:
    """What SIGKILL leaves: the file as written, no spool, the lock freed."""
    for fd in (journal._fd, journal._lock_fd):
        assert fd is not None
        os.close(fd)


def _kept_aside(state_dir: Path) -> list[Path]:
    return list(state_dir.glob("journal.unreadable-*"))


def test_an_answer_is_sealed_and_on_disk_when_append_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    journal = Journal(tmp_path / "state", _cipher())
    assert journal.open() == []
    entry = _entry()
    journal.append(entry)
    assert synced, "append returned before the journal was fsynced"

    data = (tmp_path / "state" / "journal").read_bytes()
    assert data.startswith(MAGIC)
    for secret in (b"rt_sent_0", b"rt_new_0", b"at_new_0"):
        assert secret not in data
    assert oct((tmp_path / "state" / "journal").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"

    # A crash now (no close): the next start finds the entry pending.
    _crash(journal)
    again = Journal(tmp_path / "state", _cipher())
    replayed = again.open()
    assert [e.id for e in replayed] == [entry.id]
    assert replayed[0] == entry
    again.close()


def test_done_entries_are_not_replayed_and_the_file_empties(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, _cipher())
    journal.open()
    first, second, third = _entry(1), _entry(2), _entry(3)
    journal.append(first)
    journal.append(second)
    journal.done(first.id)
    journal.append(third)  # carries first's "done" record to disk
    journal.done(second.id)  # still in memory when the crash comes
    assert list(journal.pending) == [third.id]
    _crash(journal)

    again = Journal(tmp_path, _cipher())
    # second comes back: its replay finds the token stored and does nothing.
    assert sorted(e.id for e in again.open()) == sorted([second.id, third.id])
    again.done(second.id)
    assert (tmp_path / "journal").stat().st_size > len(MAGIC)
    again.done(third.id)
    assert (tmp_path / "journal").stat().st_size == len(MAGIC)
    again.close()


def test_a_torn_tail_is_ignored_and_the_rest_replayed(tmp_path: Path) -> None:
    journal = Journal(tmp_path, _cipher())
    journal.open()
    entry = _entry()
    journal.append(entry)
    journal.close()
    with (tmp_path / "journal").open("ab") as handle:
        # The start of a frame whose write a crash cut short.
        handle.write(b"\x00\x00\x01\x00partial")
    again = Journal(tmp_path, _cipher())
    assert [e.id for e in again.open()] == [entry.id]
    again.close()


def test_a_journal_sealed_with_another_key_is_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path, _cipher(b"a" * 32, "old"))
    journal.open()
    journal.append(_entry())
    journal.close()

    caplog.set_level(logging.ERROR, logger="tokend.journal")
    again = Journal(tmp_path, _cipher(b"b" * 32, "new"))
    assert again.open() == []
    again.close()
    kept = _kept_aside(tmp_path)
    assert len(kept) == 1
    problems = [r.__dict__.get("problem", "") for r in caplog.records]
    assert any("'old'" in p for p in problems), problems

    # With the old key back, the kept file replays.
    os.replace(kept[0], tmp_path / "journal")
    old = Journal(tmp_path, _cipher(b"a" * 32, "old"))
    assert len(old.open()) == 1
    old.close()


def test_a_second_process_cannot_share_the_state_dir(tmp_path: Path) -> None:
    first = Journal(tmp_path, _cipher())
    first.open()
    with pytest.raises(ConfigErrors) as caught:
        Journal(tmp_path, _cipher()).open()
    assert caught.value.errors[0].key == "daemon.state_dir"
    assert "in use by another tokend process" in str(caught.value)
    first.close()
    Journal(tmp_path, _cipher()).open()


def test_an_unusable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigErrors) as caught:
        Journal(blocker / "state", _cipher()).open()
    assert caught.value.errors[0].key == "daemon.state_dir"
    assert str(blocker / "state") in str(caught.value)


def test_a_failing_disk_raises_and_keeps_the_entry_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, _cipher())
    journal.open()

    def full(*_: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write: Callable[..., int] = full
    monkeypatch.setattr(journal_module.os, "write", write)
    entry = _entry()
    with pytest.raises(JournalError, match="No space left"):
        journal.append(entry)
    assert journal.pending_for(entry.key) == entry
    monkeypatch.undo()
    journal.close()
    # Closing wrote the spool: the entry survives.
    again = Journal(tmp_path, _cipher())
    assert [e.id for e in again.open()] == [entry.id]
    again.close()


def test_entries_do_not_show_tokens_in_repr() -> None:
    text = repr(_entry())
    assert "rt_" not in text and "at_" not in text
    assert base64.b64encode(b"rt_sent").decode() not in text


def test_the_journal_needs_a_key_when_the_secret_store_has_none(
    tmp_path: Path,
) -> None:
    doc = config_doc("postgresql://127.0.0.1/unused")
    doc["secrets"] = {"backend": "files", "files": {"base": str(tmp_path)}}
    with pytest.raises(ConfigErrors) as caught:
        journal_cipher(parse(doc, {}, "test"))
    assert caught.value.errors[0].key == "daemon.journal_key"
    assert "encrypted" in str(caught.value)

    doc["daemon"]["journal_key"] = base64.b64encode(b"q" * 32).decode()
    journal = Journal(tmp_path / "state", journal_cipher(parse(doc, {}, "test")))
    journal.open()
    journal.append(_entry())
    journal.close()
    again = Journal(tmp_path / "state", journal_cipher(parse(doc, {}, "test")))
    assert len(again.open()) == 1
    again.close()


def test_a_journal_that_never_empties_is_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_BYTES", 4096)
    journal = Journal(tmp_path, _cipher())
    journal.open()
    waiting = _entry(0)
    journal.append(waiting)  # the database never takes this one
    for n in range(1, 40):
        entry = _entry(n)
        journal.append(entry)
        journal.done(entry.id)
    assert (tmp_path / "journal").stat().st_size < 4096
    _crash(journal)
    again = Journal(tmp_path, _cipher())
    replayed = {e.id for e in again.open()}
    # The last "done" may still have been in memory: a harmless replay.
    assert waiting.id in replayed and replayed <= {waiting.id, entry.id}
    again.close()


def test_a_damaged_journal_is_kept_aside_and_what_opens_is_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path, _cipher())
    journal.open()
    first, second = _entry(1), _entry(2)
    journal.append(first)
    journal.append(second)
    _crash(journal)
    data = bytearray((tmp_path / "journal").read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the second record
    (tmp_path / "journal").write_bytes(bytes(data))

    caplog.set_level(logging.ERROR, logger="tokend.journal")
    again = Journal(tmp_path, _cipher())
    assert [e.id for e in again.open()] == [first.id]
    again.close()
    assert len(_kept_aside(tmp_path)) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "journal unreadable; kept aside for an operator"
    ]


def test_a_file_that_is_no_journal_is_kept_aside(tmp_path: Path) -> None:
    (tmp_path / "journal").write_bytes(b"not a journal at all")
    journal = Journal(tmp_path, _cipher())
    assert journal.open() == []
    journal.close()
    (kept,) = _kept_aside(tmp_path)
    assert kept.read_bytes() == b"not a journal at all"
    assert (tmp_path / "journal").read_bytes() == MAGIC
