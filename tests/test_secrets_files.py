"""The files store's own behaviour: the host app's layout on disk, atomic
writes, and every way a file can be unusable."""

from __future__ import annotations

import os
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.stores import config_with, files_secrets
from tokend.errors import ConfigErrors, SecretError, SecretUnavailable
from tokend.secrets import APP
from tokend.secrets.files import FileSecretStore

pytestmark = pytest.mark.anyio


def files(base: Path, **more: Any) -> FileSecretStore:
    return FileSecretStore(config_with(files_secrets(base, **more)).secrets.files)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    return folder


@pytest.fixture
async def store(base: Path) -> AsyncIterator[FileSecretStore]:
    opened = files(base)
    try:
        yield opened
    finally:
        await opened.aclose()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_host_apps_layout(store: FileSecretStore, base: Path) -> None:
    t = uuid.uuid4()
    await store.put(APP, "ninjaone_client_id", b"cid")
    await store.put(t, "ninjaone_credentials", b'{"a": 1}')
    assert (base / "ninjaone_client_id").read_bytes() == b"cid"
    written = base / "tenants" / str(t) / "ninjaone_credentials"
    assert written.read_bytes() == b'{"a": 1}'
    assert mode(base / "ninjaone_client_id") == 0o600
    assert mode(written) == 0o600
    assert mode(base / "tenants") == 0o700
    assert mode(written.parent) == 0o700
    assert sorted(p.name for p in written.parent.iterdir()) == ["ninjaone_credentials"]


async def test_files_the_host_app_wrote_are_read_as_they_are(
    store: FileSecretStore, base: Path
) -> None:
    t = uuid.uuid4()
    folder = base / "tenants" / str(t)
    folder.mkdir(parents=True)
    (folder / "ninjaone_credentials").write_bytes(b"raw bytes \x00\xff")
    (base / "ninjaone_client_secret").write_text("s\n")
    found = await store.get_many(
        [(t, "ninjaone_credentials"), (APP, "ninjaone_client_secret")]
    )
    assert found == {
        (t, "ninjaone_credentials"): b"raw bytes \x00\xff",
        (APP, "ninjaone_client_secret"): b"s\n",
    }


async def test_a_kubernetes_style_symlinked_volume_is_followed(
    store: FileSecretStore, base: Path
) -> None:
    data = base / "..2026_12_01"
    data.mkdir()
    (data / "ninjaone_client_id").write_bytes(b"from a projected volume")
    (base / "..data").symlink_to(data.name)
    (base / "ninjaone_client_id").symlink_to("..data/ninjaone_client_id")
    found = await store.get_many([(APP, "ninjaone_client_id")])
    assert found == {(APP, "ninjaone_client_id"): b"from a projected volume"}


async def test_a_failed_rename_keeps_the_old_value_and_no_temp_file(
    store: FileSecretStore, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put(APP, "ninjaone_client_secret", b"old")

    def broken(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(SecretUnavailable, match="ninjaone_client_secret") as caught:
        await store.put(APP, "ninjaone_client_secret", b"new")
    assert caught.value.code == "secret_store_unreadable"
    assert (base / "ninjaone_client_secret").read_bytes() == b"old"
    assert os.listdir(base) == ["ninjaone_client_secret"]


async def test_a_write_syncs_the_file_and_its_folder(
    store: FileSecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append(kind)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await store.put(uuid.uuid4(), "ninjaone_credentials", b"v")
    # The file, then its folder, then the folders whose entries changed.
    assert synced[0] == "file"
    assert synced.count("folder") >= 2


async def test_a_folder_in_the_place_of_a_secret_is_an_error_naming_it(
    store: FileSecretStore, base: Path
) -> None:
    (base / "ninjaone_client_id").mkdir()
    with pytest.raises(SecretError, match=str(base / "ninjaone_client_id")):
        await store.get_many([(APP, "ninjaone_client_id")])


async def test_a_fifo_is_refused_without_hanging(
    store: FileSecretStore, base: Path
) -> None:
    os.mkfifo(base / "ninjaone_client_id")
    with anyio.fail_after(5), pytest.raises(SecretError, match="not a regular file"):
        await store.get_many([(APP, "ninjaone_client_id")])


async def test_a_file_over_the_limit_is_an_error(base: Path) -> None:
    store = files(base, max_bytes=10)
    (base / "big").write_bytes(b"x" * 11)
    (base / "small").write_bytes(b"x" * 10)
    assert await store.get_many([(APP, "small")]) == {(APP, "small"): b"x" * 10}
    with pytest.raises(SecretError, match=r"big is over 10 bytes"):
        await store.get_many([(APP, "big")])


async def test_a_file_where_the_tenants_folder_belongs_is_an_error(
    store: FileSecretStore, base: Path
) -> None:
    (base / "tenants").write_text("oops")
    with pytest.raises(SecretError, match="tenants"):
        await store.get_many([(uuid.uuid4(), "ninjaone_credentials")])
    with pytest.raises(SecretError, match="tenants folder"):
        await store.put(APP, "tenants", b"x")


async def test_a_missing_base_is_unavailable_not_no_secrets(tmp_path: Path) -> None:
    store = files(tmp_path / "not-mounted")
    with pytest.raises(SecretUnavailable, match="not-mounted") as reading:
        await store.get_many([(APP, "ninjaone_client_id")])
    with pytest.raises(SecretUnavailable, match="not-mounted"):
        await store.put(APP, "ninjaone_client_id", b"x")
    assert reading.value.code == "secret_store_unreadable"
    assert not (tmp_path / "not-mounted").exists()


async def test_permission_denied_names_the_path_and_waits(
    store: FileSecretStore, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which reads anything: refuse the open instead.
    (base / "ninjaone_client_id").write_bytes(b"x")
    real = os.open

    def denied(path: Any, *args: Any, **kw: Any) -> int:
        if str(path).endswith("ninjaone_client_id"):
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(SecretUnavailable) as caught:
        await store.get_many([(APP, "ninjaone_client_id")])
    assert str(base / "ninjaone_client_id") in str(caught.value)
    assert "Permission denied" in str(caught.value)


async def test_slow_io_times_out_and_threads_are_bounded(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = files(base, io_timeout_s=0.3, threads=2)
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def slow(path: Path) -> bytes | None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return None

    monkeypatch.setattr(store, "_read", slow)
    started = time.monotonic()
    failures: list[SecretUnavailable] = []

    async def one() -> None:
        try:
            await store.get_many([(APP, "x")])
        except SecretUnavailable as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    release.set()
    assert len(failures) == 5
    assert {f.code for f in failures} == {"secret_store_timeout"}
    assert time.monotonic() - started < 3
    assert most <= 2


async def test_a_reload_keeps_the_base_and_applies_the_rest(
    store: FileSecretStore, base: Path, tmp_path: Path
) -> None:
    moved = config_with(files_secrets(tmp_path / "elsewhere", io_timeout_s=1.5))
    assert store.reload(moved.secrets) == ["secrets.files.base"]
    assert store.base == base
    assert store.config.io_timeout_s == 1.5
    same = config_with(files_secrets(base, threads=3))
    assert store.reload(same.secrets) == []


def test_the_base_must_be_an_absolute_path() -> None:
    with pytest.raises(ConfigErrors, match=r"secrets\.files\.base: expected an abs"):
        config_with(files_secrets(Path("relative/secrets")))
    with pytest.raises(ConfigErrors, match=r"secrets\.files\.base: required"):
        config_with({"backend": "files"})
