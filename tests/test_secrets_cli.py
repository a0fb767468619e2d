"""`tokend secrets put|get|rotate-key` as real processes, on each store."""

from __future__ import annotations

import base64
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.bao import Bao
from tests.helpers import SECRET_KEY, config_doc, write_config
from tests.stores import NO_DATABASE, files_secrets, vault_secrets

pytestmark = pytest.mark.anyio

K2 = base64.b64encode(b"2" * 32).decode()


async def tokend(*args: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "tokend", *args], input=stdin, check=False
    )
    return result.returncode, result.stdout, result.stderr.decode()


def config_file(tmp_path: Path, dsn: str, secrets: dict[str, Any]) -> str:
    doc = config_doc(dsn)
    doc["secrets"] = secrets
    return str(write_config(tmp_path / "tokend.toml", doc))


@pytest.fixture(params=["postgres", "files", "vault"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        dsn = request.getfixturevalue("dsn")
        return config_file(tmp_path, dsn, {"key": SECRET_KEY})
    if request.param == "files":
        base = tmp_path / "secrets"
        base.mkdir()
        return config_file(tmp_path, NO_DATABASE, files_secrets(base))
    bao: Bao = request.getfixturevalue("bao")
    return config_file(tmp_path, NO_DATABASE, vault_secrets(bao))


async def test_put_get_and_reveal(config: str) -> None:
    tenant = str(uuid.uuid4())
    put = await tokend(
        "secrets", "put", "-c", config, "--tenant", tenant, "ninjaone_credentials",
        stdin=b'{"refresh_token": "rt-secret"}\n',
    )  # fmt: skip
    assert put[0] == 0, put
    assert b"stored 'ninjaone_credentials'" in put[1] and b"30 bytes" in put[1]

    code, out, err = await tokend(
        "secrets", "get", "--config", config, "--tenant", tenant, "ninjaone_credentials"
    )
    assert code == 0, err
    text = out.decode()
    assert f"tenant: {tenant}" in text
    assert "size: 30 bytes" in text
    assert "updated_at: 20" in text
    assert "rt-secret" not in text

    code, out, err = await tokend(
        "secrets", "get", "--config", config, "--tenant", tenant,
        "ninjaone_credentials", "--reveal",
    )  # fmt: skip
    assert code == 0, err
    assert out == b'{"refresh_token": "rt-secret"}'


async def test_app_secrets_are_the_default_tenant(config: str) -> None:
    put = await tokend(
        "secrets", "put", "--config", config, "ninjaone_client_id", stdin=b"cid"
    )
    assert put[0] == 0, put
    assert b"for the app" in put[1]
    code, out, _ = await tokend(
        "secrets", "get", "--config", config, "ninjaone_client_id", "--reveal"
    )
    assert (code, out) == (0, b"cid")


async def test_each_backend_shows_its_own_metadata(
    tmp_path: Path, dsn: str, bao: Bao
) -> None:
    base = tmp_path / "host-secrets"
    base.mkdir()
    expected = {
        "postgres": ({"key": SECRET_KEY}, dsn, "key_id: k1"),
        "files": (files_secrets(base), NO_DATABASE, f"path: {base}/ninjaone_client_id"),
        "vault": (vault_secrets(bao), NO_DATABASE, "version: 1"),
    }
    for backend, (secrets, database, line) in expected.items():
        folder = tmp_path / backend
        folder.mkdir()
        config = config_file(folder, database, secrets)
        await tokend("secrets", "put", "-c", config, "ninjaone_client_id", stdin=b"x")
        code, out, err = await tokend(
            "secrets", "get", "-c", config, "ninjaone_client_id"
        )
        assert code == 0, err
        assert line in out.decode(), (backend, out)
        assert f"backend: {backend}" in out.decode()
    assert stat.S_IMODE((base / "ninjaone_client_id").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "stdin", "code", "problem"),
    [
        (["--tenant", "not-a-uuid", "x"], b"v", 2, "not a uuid"),
        (["../escape"], b"v", 2, "path separator"),
        ([".."], b"v", 2, "starts with a dot"),
        (["name"], b"", 2, "no value on standard input"),
        (["name"], b"\n", 2, "no value on standard input"),
        (["name"], b"x" * (1024 * 1024 + 1), 2, "over 1048576 bytes"),
    ],
)
async def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], stdin: bytes, code: int, problem: str
) -> None:
    base = tmp_path / "secrets"
    base.mkdir()
    config = config_file(tmp_path, NO_DATABASE, files_secrets(base))
    result = await tokend("secrets", "put", "--config", config, *args, stdin=stdin)
    assert result[0] == code
    assert problem in result[2]
    assert len(result[2].strip().splitlines()) == 1
    assert list(base.iterdir()) == []


async def test_a_missing_secret_and_a_broken_store_exit_1(
    tmp_path: Path, bao: Bao
) -> None:
    base = tmp_path / "secrets"
    base.mkdir()
    config = config_file(tmp_path, NO_DATABASE, files_secrets(base))
    code, _, err = await tokend("secrets", "get", "-c", config, "nothing_here")
    assert code == 1
    assert err == "tokend: no secret 'nothing_here' for the app\n"

    down = vault_secrets(bao, address="http://127.0.0.1:1")
    config = config_file(tmp_path, NO_DATABASE, down)
    code, _, err = await tokend("secrets", "put", "-c", config, "x", stdin=b"v")
    assert code == 1
    assert err.startswith("tokend: Vault at http://127.0.0.1:1 did not answer")
    assert len(err.splitlines()) == 1


async def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = config_file(tmp_path, NO_DATABASE, {"backend": "vault"})
    code, _, err = await tokend("secrets", "get", "-c", config, "x")
    assert code == 2
    assert "secrets.vault.address: required" in err
    code, _, err = await tokend("secrets", "get", "-c", str(tmp_path / "none"), "x")
    assert code == 2


async def test_rotate_key_from_the_command_line(tmp_path: Path, dsn: str) -> None:
    old = config_file(tmp_path, dsn, {"key": SECRET_KEY})
    for i in range(3):
        stored = await tokend(
            "secrets", "put", "-c", old, "--tenant", str(uuid.uuid4()), "x",
            stdin=f"value {i}".encode(),
        )  # fmt: skip
        assert stored[0] == 0, stored
    (tmp_path / "new").mkdir()
    secrets = {"key": K2, "key_id": "k2", "old_keys": {"k1": {"key": SECRET_KEY}}}
    new = config_file(tmp_path / "new", dsn, secrets)

    code, out, err = await tokend("secrets", "rotate-key", "-c", new, "--batch", "2")
    assert code == 0, err
    assert out == b"re-encrypted 3 secrets with key 'k2' in 2 batches\n"
    conn = await asyncpg.connect(dsn)
    try:
        ids = await conn.fetch("SELECT DISTINCT key_id FROM tokend_secrets")
    finally:
        await conn.close()
    assert [r["key_id"] for r in ids] == ["k2"]

    # The old key gone from the config: a row still under it is named.
    code, out, err = await tokend("secrets", "rotate-key", "-c", new)
    assert (code, out) == (0, b"re-encrypted 0 secrets with key 'k2' in 0 batches\n")
    await tokend("secrets", "put", "-c", old, "y", stdin=b"left behind")
    (tmp_path / "only").mkdir()
    only_new = config_file(tmp_path / "only", dsn, {"key": K2, "key_id": "k2"})
    code, out, err = await tokend(
        "secrets", "rotate-key", "-c", only_new, "--wait", "0"
    )
    assert code == 1
    assert "1 secrets did not open: secret_key_unknown (key id 'k1')" in err
    for material in (SECRET_KEY, K2):
        assert material not in err and material.encode() not in out


async def test_rotate_key_is_for_the_postgres_store(tmp_path: Path) -> None:
    base = tmp_path / "secrets"
    base.mkdir()
    config = config_file(tmp_path, NO_DATABASE, files_secrets(base))
    code, _, err = await tokend("secrets", "rotate-key", "-c", config)
    assert code == 2
    assert "backend is files" in err
