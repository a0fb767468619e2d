"""The Vault store: HashiCorp Vault or OpenBao, KV version 2, over HTTP.

A secret (tenant, name) is the KV secret `<app_path>/<name>` or
`<tenant_path>/<name>` (with `{tenantId}` filled in) under the mount; its
value is one key of the secret's data (`field`, default `value`). Other
keys of that data are kept on write.

Writes use check-and-set with the version last read or written: a secret
someone else changed since is never overwritten (`SecretConflict`); a
secret never read is read first. Vault's answers map to outcomes: 404 is
"no secret"; 403, a sealed Vault (503), 5xx, 429, timeouts and a wrong
mount or namespace are `SecretUnavailable` with a code, so integrations
wait and alert instead of being marked for reconnect.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

import aiohttp
import anyio
import orjson

from tokend.config import SecretsConfig, VaultConfig
from tokend.db import Conn
from tokend.errors import ConfigError, SecretConflict, SecretError, SecretUnavailable
from tokend.secrets import (
    APP,
    MAX_VALUE_BYTES,
    SecretInfo,
    SecretKey,
    check_name,
    check_value,
)

logger = logging.getLogger(__name__)

# Versions remembered for check-and-set; a miss costs one extra read.
_REMEMBERED = 4096
_CAS_MISMATCH = "check-and-set parameter did not match"
# Settings that move where secrets are, or how Vault is reached: changing
# them under a running refresh could read one place and write another.
_RESTART = (
    "address",
    "namespace",
    "mount",
    "app_path",
    "tenant_path",
    "field",
    "ca_file",
    "connections",
)


@dataclass(frozen=True)
class _Seen:
    """A secret as last read or written: its version and its whole data."""

    version: int
    data: dict[str, Any]
    structured: bool = False


@dataclass(frozen=True)
class _Found:
    value: bytes | None
    version: int
    created: float | None


class VaultSecretStore:
    backend = "vault"

    def __init__(self, config: VaultConfig) -> None:
        if config.token is None:
            raise ConfigError("secrets.vault.token", "required for backend vault")
        self.config = config
        self._token = config.token
        self._ssl = _ssl_context(config.ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._seen: OrderedDict[SecretKey, _Seen] = OrderedDict()

    def path(self, tenant: UUID, name: str) -> str:
        """The secret's path under the mount."""
        check_name(name)
        if tenant == APP:
            return f"{self.config.app_path}/{name}"
        prefix = self.config.tenant_path.replace("{tenantId}", str(tenant))
        return f"{prefix}/{name}"

    def where(self, path: str) -> str:
        return f"{self.config.mount}/data/{path}"

    # -- the store ----------------------------------------------------------

    async def get_many(
        self, keys: Iterable[SecretKey], *, conn: Conn | None = None
    ) -> dict[SecretKey, bytes]:
        wanted = list(dict.fromkeys(keys))
        for tenant, name in wanted:
            self.path(tenant, name)
        found: dict[SecretKey, bytes] = {}
        failures: list[SecretError | SecretUnavailable] = []

        async def one(key: SecretKey) -> None:
            try:
                result = await self._read(key)
            except (SecretError, SecretUnavailable) as exc:
                failures.append(exc)
                return
            if result.value is not None:
                found[key] = result.value

        async with anyio.create_task_group() as tg:
            for key in wanted:
                tg.start_soon(one, key)
        if failures:
            # A store-wide problem explains the rest: report it first.
            failures.sort(key=lambda e: not isinstance(e, SecretUnavailable))
            raise failures[0]
        return found

    async def put(
        self,
        tenant: UUID,
        name: str,
        value: bytes,
        *,
        conn: Conn | None = None,
    ) -> None:
        key = (tenant, name)
        path = self.path(tenant, name)
        check_value(value)
        seen = self._seen.get(key)
        if seen is None:
            await self._read(key)
            seen = self._seen[key]
        data = dict(seen.data)
        data[self.config.field] = _encode(value, seen.structured, self.where(path))
        body = {"options": {"cas": seen.version}, "data": data}
        status, doc = await self._request("POST", path, body)
        if status == 400 and _CAS_MISMATCH in " ".join(_errors(doc)):
            self._seen.pop(key, None)
            raise SecretConflict(
                f"Vault secret {self.where(path)} changed since version "
                f"{seen.version} was read; not overwritten"
            )
        if status not in (200, 204):
            raise self._failure(status, doc, f"write {self.where(path)}")
        version = _dig(doc, "data", "version")
        if isinstance(version, int):
            self._remember(key, _Seen(version, data, seen.structured))
        else:
            self._seen.pop(key, None)

    async def describe(self, tenant: UUID, name: str) -> SecretInfo | None:
        path = self.path(tenant, name)
        found = await self._read((tenant, name))
        if found.value is None:
            return None
        details = {"path": self.where(path), "version": str(found.version)}
        return SecretInfo(len(found.value), found.created, details)

    def reload(self, config: SecretsConfig) -> list[str]:
        if config.backend != self.backend:
            return ["secrets.backend"]
        new = config.vault
        restart = [
            f"secrets.vault.{name}"
            for name in _RESTART
            if getattr(new, name) != getattr(self.config, name)
        ]
        if new.token is not None and new.token != self._token:
            self._token = new.token
            logger.info("vault token reloaded")
        kept = {name: getattr(self.config, name) for name in _RESTART}
        self.config = dataclasses.replace(new, **kept)
        return restart

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- Vault's API --------------------------------------------------------

    async def _read(self, key: SecretKey) -> _Found:
        path = self.path(*key)
        status, doc = await self._request("GET", path)
        if status == 404 and _no_secret(doc):
            # No secret, or every version deleted: remember the version a
            # write must name.
            version = _dig(doc, "data", "metadata", "version")
            version = version if isinstance(version, int) else 0
            self._remember(key, _Seen(version, {}))
            return _Found(None, version, None)
        if status != 200:
            raise self._failure(status, doc, f"read {self.where(path)}")
        data = _dig(doc, "data", "data")
        version = _dig(doc, "data", "metadata", "version")
        if not isinstance(data, dict) or not isinstance(version, int):
            raise SecretUnavailable(
                f"Vault answered a read of {self.where(path)} with no KV v2 "
                "secret: is the mount KV version 2?",
                code="secret_store_misconfigured",
            )
        if self.config.field not in data:
            raise SecretError(
                f"Vault secret {self.where(path)} has no key "
                f"{self.config.field!r} (secrets.vault.field)"
            )
        raw = data[self.config.field]
        structured = not isinstance(raw, str)
        self._remember(key, _Seen(version, data, structured))
        value = orjson.dumps(raw) if structured else raw.encode()
        created = _timestamp(_dig(doc, "data", "metadata", "created_time"))
        return _Found(value, version, created)

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        config = self.config
        url = f"{config.address}/v1/{config.mount}/data/{quote(path, safe='/')}"
        headers = {"X-Vault-Token": self._token, "X-Vault-Request": "true"}
        if config.namespace:
            headers["X-Vault-Namespace"] = config.namespace
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method,
                url,
                data=None if body is None else orjson.dumps(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=config.timeout_s),
                # A standby's redirect would carry the token to another host.
                allow_redirects=False,
            ) as response:
                raw = await _body(response, MAX_VALUE_BYTES * 2)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            )
            raise SecretUnavailable(
                f"Vault at {config.address} did not answer ({reason})",
                code="secret_store_unavailable",
            ) from None
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            doc = {}
        return status, doc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.connections, ssl=self._ssl or True
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _failure(self, status: int, doc: Any, what: str) -> SecretUnavailable:
        said = "; ".join(_errors(doc))[:200] or "no error text"
        message = f"Vault refused to {what}: {status} ({said})"
        if status in (401, 403):
            code = "secret_store_denied"
            message += "; check the token and its policy"
        elif status == 503 and "sealed" in said.lower():
            code = "secret_store_sealed"
        elif status in (429, 412) or status >= 500:
            code = "secret_store_unavailable"
        else:
            code = "secret_store_misconfigured"
            if status == 404:
                message += "; check secrets.vault.mount and namespace"
        return SecretUnavailable(message, code=code)

    def _remember(self, key: SecretKey, seen: _Seen) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)


def _ssl_context(ca_file: str) -> ssl.SSLContext | None:
    if not ca_file:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        problem = f"cannot load CA bundle: {getattr(exc, 'strerror', None) or exc}"
        raise ConfigError("secrets.vault.ca_file", problem) from None


def _encode(value: bytes, structured: bool, where: str) -> Any:
    """Vault keeps text: a JSON value where the secret held one, else a string."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise SecretError(f"value for Vault secret {where} is not UTF-8 text") from None
    if structured:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return text


async def _body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise SecretUnavailable(
                f"Vault's answer is over {limit} bytes", code="secret_store_unavailable"
            )
    return bytes(body)


def _no_secret(doc: Any) -> bool:
    """Vault's own 404 for a path without a secret, not a wrong mount,
    namespace or server (those carry an error text, or no JSON at all)."""
    if not isinstance(doc, dict):
        return False
    return doc.get("errors") == [] or isinstance(_dig(doc, "data", "metadata"), dict)


def _errors(doc: Any) -> list[str]:
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    return [str(e) for e in errors]


def _dig(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _timestamp(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
