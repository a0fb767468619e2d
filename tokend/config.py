"""The configuration: a TOML file validated as a whole into frozen objects.

Every setting is declared once, as a dataclass field; its default, its check
and its documentation live together. Validation collects every problem in
the file before failing, and each message names the key to fix.

A secret setting `x` (the database DSN, client credentials, the secret-store
key) may instead be given as `x_env` (the name of an environment variable) or
`x_file` (a path); exactly one of the three. Secret values are never echoed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from tokend.errors import ConfigError, ConfigErrors, SecretError
from tokend.providers import check_token_url, host_pattern
from tokend.secrets import check_name

Check = Callable[[Any], Any]
T = TypeVar("T")


def _type_name(value: Any) -> str:
    return type(value).__name__


# No duration tokend waits for is longer than a year; past it (or nan, inf)
# a value is a typo, and would overflow timers and Postgres settings.
MAX_SECONDS = 366 * 86400


def _seconds(*, allow_zero: bool = False) -> Check:
    def check(value: Any) -> float:
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok_type:
            raise ValueError(f"expected seconds, got {_type_name(value)} {value!r}")
        if not math.isfinite(value) or value > MAX_SECONDS:
            raise ValueError(f"expected seconds up to {MAX_SECONDS}, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"expected seconds {bound}, got {value!r}")
        return float(value)

    return check


def _count(minimum: int = 1) -> Check:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_type_name(value)} {value!r}")
        if not minimum <= value <= 1_000_000:
            problem = f"expected an integer from {minimum} to 1000000, got {value!r}"
            raise ValueError(problem)
        return value

    return check


def _rate(value: Any) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 < value <= 1_000_000:
        raise ValueError(f"expected a number per second > 0, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_type_name(value)}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return check


def _identifier(value: Any) -> str:
    text = _text(value)
    if not text.replace("_", "").isalnum() or len(text) > 63:
        raise ValueError(f"expected a Postgres identifier ([a-z0-9_]), got {text!r}")
    return text


def _listen(value: Any) -> str:
    text = _text(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return text


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PATH = re.compile(r"(/[A-Za-z0-9_.~-]+)+/?")


def _token_path(value: Any) -> str:
    text = _text(value)
    if not _PATH.fullmatch(text) or "/../" in text + "/" or "/./" in text + "/":
        raise ValueError(f"expected a path such as /oauth/token, got {text!r}")
    return text


def _host_patterns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of host patterns")
    return tuple(host_pattern(item) for item in value)


def _secret_name(value: Any) -> str:
    try:
        return check_name(_text(value))
    except SecretError as exc:
        raise ValueError(str(exc)) from None


def _key_id(value: Any) -> str:
    text = _text(value)
    if len(text) > 64 or not text.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"expected a key id of [A-Za-z0-9_-], got {text!r}")
    return text


def _path(value: Any) -> str:
    if value == "":
        return ""
    text = _text(value)
    if not os.path.isabs(text) or "\0" in text:
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


def _vault_address(value: Any) -> str:
    if value == "":
        return ""
    text = _text(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s)://host:port URL, got {text!r}")
    if parts.path or parts.query or parts.fragment or parts.username:
        raise ValueError(f"expected scheme, host and port only, got {text!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # The token would cross the network in clear text.
        raise ValueError(f"plain http only to a loopback address, got {text!r}")
    return text


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _vault_path(value: Any, *, empty: bool = False) -> str:
    if empty and value == "":
        return ""
    text = _text(value)
    segments = text.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or "\0" in segment or "{" in segment:
            raise ValueError(f"expected a path like a/b/c, got {text!r}")
    return text


def _tenant_template(value: Any) -> str:
    text = _text(value)
    if text.count("{tenantId}") != 1:
        raise ValueError(f"expected one {{tenantId}} in the path, got {text!r}")
    _vault_path(text.replace("{tenantId}", "t"))
    return text


def setting(default: Any, check: Check, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


def secret(doc: str = "", *, required: bool = False) -> Any:
    # repr=False: a config printed in a traceback or a debugger shows no secret.
    return field(
        default=None,
        repr=False,
        metadata={"secret": True, "required": required, "doc": doc},
    )


def keyring(doc: str = "") -> Any:
    """A table of secret keys by id: `[x.<id>]` holding key, key_env or key_file."""
    return field(default_factory=dict, metadata={"keyring": True, "doc": doc})


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = secret("Postgres DSN of the host database", required=True)
    pool_size: int = setting(20, _count(2), "connections in the refresh pool")
    connect_timeout_s: float = setting(5.0, _seconds())
    statement_timeout_s: float = setting(15.0, _seconds())
    integrations_table: str = setting("rmm_integrations", _identifier)


@dataclass(frozen=True)
class LeaderConfig:
    lock_name: str = setting("tokend", _text, "namespace of the leader lock key")
    lock_timeout_s: float = setting(5.0, _seconds())
    heartbeat_interval_s: float = setting(5.0, _seconds())
    heartbeat_timeout_s: float = setting(4.0, _seconds())
    lease_s: float = setting(10.0, _seconds())
    keepalive_idle_s: int = setting(10, _count())
    keepalive_interval_s: int = setting(3, _count())
    keepalive_count: int = setting(3, _count())
    tcp_user_timeout_s: int = setting(20, _count())
    reconnect_initial_s: float = setting(0.5, _seconds())
    reconnect_max_s: float = setting(30.0, _seconds())


@dataclass(frozen=True)
class SchedulerConfig:
    buffer_s: float = setting(900.0, _seconds(), "refresh this long before expiry")
    min_delay_s: float = setting(30.0, _seconds(allow_zero=True))
    spread_s: float = setting(60.0, _seconds(allow_zero=True))
    concurrency: int = setting(16, _count())
    resync_interval_s: float = setting(300.0, _seconds())
    max_sleep_s: float = setting(30.0, _seconds())
    refresh_now_interval_s: float = setting(60.0, _seconds(allow_zero=True))


@dataclass(frozen=True)
class RetryConfig:
    initial_s: float = setting(5.0, _seconds())
    max_s: float = setting(300.0, _seconds())
    retry_after_cap_s: float = setting(900.0, _seconds())
    expiring_warning_s: float = setting(300.0, _seconds(allow_zero=True))
    # After invalid_grant with an unchanged stored refresh token, look again
    # this much later: a host app refreshing without tokend's lock may hold
    # the rotated token and not have stored it yet.
    rotation_recheck_s: float = setting(2.0, _seconds(allow_zero=True))


@dataclass(frozen=True)
class NotifyConfig:
    channel: str = setting("tokend", _identifier)
    events_channel: str = setting("tokend_events", _identifier)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = setting(True, _flag)
    listen: str = setting("127.0.0.1:9464", _listen)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", _choice("debug", "info", "warning", "error"))
    format: str = setting("auto", _choice("auto", "json", "text"))


@dataclass(frozen=True)
class FilesConfig:
    base: str = setting("", _path, "the host app's secrets folder")
    max_bytes: int = setting(1 << 20, _count(), "a larger secret file is an error")
    io_timeout_s: float = setting(5.0, _seconds())
    threads: int = setting(8, _count(), "file operations at once")


@dataclass(frozen=True)
class VaultConfig:
    address: str = setting("", _vault_address, "https://host:8200")
    token: str | None = secret("Vault token; re-read on SIGHUP")
    namespace: str = setting("", lambda v: _vault_path(v, empty=True))
    mount: str = setting("secret", _vault_path, "KV v2 mount")
    app_path: str = setting("tokend", _vault_path)
    tenant_path: str = setting("tokend/tenants/{tenantId}", _tenant_template)
    field: str = setting("value", _text, "the key of a secret's data")
    timeout_s: float = setting(10.0, _seconds(), "per request")
    ca_file: str = setting("", _path, "CA bundle for the server's certificate")
    connections: int = setting(32, _count(), "requests in flight at once")


@dataclass(frozen=True)
class SecretsConfig:
    backend: str = setting("postgres", _choice("postgres", "files", "vault"))
    key: str | None = secret("base64 of a 32-byte AES-256-GCM key")
    key_id: str = setting("k1", _key_id, "id of the key new writes use")
    old_keys: Mapping[str, str] = keyring("older keys, still opened for rotation")
    files: FilesConfig = field(default_factory=FilesConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)


@dataclass(frozen=True)
class DaemonConfig:
    instance_id: str = setting("", lambda v: v if v == "" else _text(v))
    shutdown_grace_s: float = setting(20.0, _seconds(allow_zero=True))
    state_dir: str = setting("/var/lib/tokend", _text, "the write-ahead journal")
    journal_key: str | None = secret(
        "base64 of a 32-byte AES-256-GCM key sealing the journal; default: "
        "secrets.key (and secrets.old_keys)"
    )
    inflight_wait_s: float = setting(
        10.0,
        _seconds(allow_zero=True),
        "how long a refresh left in flight by another process waits for that "
        "process's replay before retrying with the stored refresh token",
    )


@dataclass(frozen=True)
class ProviderConfig:
    """One `[providers.NAME]` table; NAME is the `provider` column's value.

    Empty `kind` and secret names are filled in from NAME by the loader.
    """

    kind: str = setting("", _choice("ninjaone", "oauth2"))
    token_path: str = setting("/oauth/token", _token_path)
    token_url: str = setting("", _text)
    token_hosts: tuple[str, ...] = setting((), _host_patterns)
    client_auth: str = setting(
        "client_secret_post", _choice("client_secret_post", "client_secret_basic")
    )
    scope: str = setting("", lambda v: v if v == "" else _text(v))
    credentials_secret: str = setting("", _secret_name)
    client_id_secret: str = setting("", _secret_name)
    client_secret_secret: str = setting("", _secret_name)
    client_id: str | None = secret("fallback client id")
    client_secret: str | None = secret("fallback client secret")
    allow_http_loopback: bool = setting(False, _flag)
    default_expires_in_s: float = setting(3600.0, _seconds())
    request_timeout_s: float = setting(15.0, _seconds())
    max_body_bytes: int = setting(65536, _count(1024))
    rate_per_s: float = setting(50.0, _rate)


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    leader: LeaderConfig = field(default_factory=LeaderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    source: str = ""

    @property
    def instance_id(self) -> str:
        return self.daemon.instance_id or f"{socket.gethostname()}:{os.getpid()}"

    def provider(self, name: str) -> ProviderConfig | None:
        return self.providers.get(name)


class _Loader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[ConfigError] = []

    def section(self, cls: type[T], table: Any, path: str) -> T:
        if not isinstance(table, dict):
            self.errors.append(ConfigError(path, "expected a table"))
            table = {}
        declared = fields(cast(Any, cls))
        secret_keys = {f.name for f in declared if f.metadata.get("secret")}
        allowed = {f.name for f in declared} | {
            f"{name}_{suffix}" for name in secret_keys for suffix in ("env", "file")
        }
        for key in table:
            if key not in allowed:
                self.errors.append(ConfigError(f"{path}.{key}", "unknown key"))
        values: dict[str, Any] = {}
        for f in declared:
            if f.metadata.get("secret"):
                values[f.name] = self.secret(table, f.name, path, f.metadata)
            elif f.metadata.get("keyring"):
                values[f.name] = self.keyring(table.get(f.name, {}), f"{path}.{f.name}")
            elif is_dataclass(f.default_factory):
                sub = cast(type, f.default_factory)
                sub_path = f"{path}.{f.name}"
                values[f.name] = self.section(sub, table.get(f.name, {}), sub_path)
            elif f.name in table:
                values[f.name] = self.value(table[f.name], f, f"{path}.{f.name}")
        return cls(**values)

    def keyring(self, table: Any, path: str) -> dict[str, str]:
        if not isinstance(table, dict):
            self.errors.append(ConfigError(path, "expected a table of keys by id"))
            return {}
        found = {}
        meta = {"required": True}
        for key_id, sub in table.items():
            where = f"{path}.{key_id}"
            try:
                _key_id(key_id)
            except ValueError as exc:
                self.errors.append(ConfigError(where, str(exc)))
                continue
            if not isinstance(sub, dict):
                self.errors.append(ConfigError(where, "expected a table with key"))
                continue
            for extra in set(sub) - {"key", "key_env", "key_file"}:
                self.errors.append(ConfigError(f"{where}.{extra}", "unknown key"))
            material = self.secret(sub, "key", where, meta)
            if material is not None:
                found[key_id] = material
        return found

    def value(self, raw: Any, f: Any, key: str) -> Any:
        try:
            return f.metadata["check"](raw)
        except ValueError as exc:
            self.errors.append(ConfigError(key, str(exc)))
            return f.default

    def secret(
        self, table: dict[str, Any], name: str, path: str, meta: Mapping[str, Any]
    ) -> str | None:
        given = [k for k in (name, f"{name}_env", f"{name}_file") if k in table]
        if len(given) > 1:
            self.errors.append(
                ConfigError(f"{path}.{name}", f"give only one of {', '.join(given)}")
            )
            return None
        if not given:
            if meta.get("required"):
                self.errors.append(
                    ConfigError(
                        f"{path}.{name}", f"required (or {name}_env, {name}_file)"
                    )
                )
            return None
        return self.resolve(table[given[0]], given[0], f"{path}.{given[0]}")

    def resolve(self, raw: Any, given: str, key: str) -> str | None:
        """The value of a secret given as x, x_env or x_file."""
        if not isinstance(raw, str) or not raw:
            self.errors.append(ConfigError(key, "expected a non-empty string"))
            return None
        if given.endswith("_env"):
            if not _ENV_NAME.fullmatch(raw):
                # Likely the secret itself in the wrong key: never echo it.
                problem = "expected the name of an environment variable"
                self.errors.append(ConfigError(key, problem))
                return None
            if raw not in self.env:
                problem = f"environment variable {raw} is not set"
                self.errors.append(ConfigError(key, problem))
                return None
            return self.env[raw]
        if given.endswith("_file"):
            # Name the file only when it looks like a path, not a pasted secret.
            shown = raw if os.path.isabs(raw) and "=" not in raw else "the file"
            try:
                return Path(raw).read_text().strip()
            except OSError as exc:
                problem = f"cannot read {shown}: {exc.strerror}"
                self.errors.append(ConfigError(key, problem))
                return None
            except UnicodeDecodeError:
                problem = f"{shown} is not UTF-8 text (a key file holds base64)"
                self.errors.append(ConfigError(key, problem))
                return None
        return raw

    def providers(self, table: Any) -> dict[str, ProviderConfig]:
        if not isinstance(table, dict):
            self.errors.append(ConfigError("providers", "expected a table"))
            table = {}
        result = {}
        for name, sub in {"ninjaone": {}, **table}.items():
            path = f"providers.{name}"
            if not _NAME.fullmatch(name) or len(name) > 63:
                problem = "a provider name is [A-Za-z0-9_.-], at most 63 characters"
                self.errors.append(ConfigError(path, problem))
                continue
            if not isinstance(sub, dict):
                self.errors.append(ConfigError(path, "expected a table"))
                continue
            provider = _named(name, self.section(ProviderConfig, sub, path))
            self.errors.extend(_provider_checks(provider, sub, path))
            result[name] = provider
        return result


def _named(name: str, provider: ProviderConfig) -> ProviderConfig:
    """Fill in what defaults to the provider's name."""
    return dataclasses.replace(
        provider,
        kind=provider.kind or ("ninjaone" if name == "ninjaone" else "oauth2"),
        credentials_secret=provider.credentials_secret or f"{name}_credentials",
        client_id_secret=provider.client_id_secret or f"{name}_client_id",
        client_secret_secret=provider.client_secret_secret or f"{name}_client_secret",
    )


def _provider_checks(
    provider: ProviderConfig, given: Mapping[str, Any], path: str
) -> list[ConfigError]:
    """Where the token URL comes from: built in (ninjaone), one fixed URL, or
    the integration's instance_url restricted to host patterns (oauth2)."""
    if provider.kind == "ninjaone":
        return [
            ConfigError(
                f"{path}.{key}", "only for kind oauth2; NinjaOne's hosts are built in"
            )
            for key in ("token_url", "token_hosts")
            if key in given
        ]
    if "token_url" in given and "token_hosts" in given:
        return [
            ConfigError(
                f"{path}.token_hosts", "give token_url or token_hosts, not both"
            )
        ]
    if "token_url" in given:
        try:
            check_token_url(provider.token_url, provider.allow_http_loopback)
        except ValueError as exc:
            return [ConfigError(f"{path}.token_url", str(exc))]
        return []
    if "token_hosts" not in given:
        return [
            ConfigError(
                f"{path}.token_url",
                "kind oauth2 needs token_url "
                "(one fixed URL) or token_hosts (host patterns)",
            )
        ]
    return []


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(Config)
    if f.default_factory is not MISSING and is_dataclass(f.default_factory)
}


def parse(data: Mapping[str, Any], env: Mapping[str, str], source: str) -> Config:
    """Validate a parsed TOML document; raise ConfigErrors naming every problem."""
    loader = _Loader(env)
    values: dict[str, Any] = {}
    for key in data:
        if key not in _SECTIONS and key != "providers":
            loader.errors.append(ConfigError(key, "unknown section"))
    for name, cls in _SECTIONS.items():
        values[name] = loader.section(cls, data.get(name, {}), name)
    values["providers"] = loader.providers(data.get("providers", {}))
    config = Config(**values, source=source)
    # A setting already reported (say, a key that is not base64) is not
    # reported again as missing.
    reported = [e.key for e in loader.errors]
    for error in _cross_checks(config):
        if not any(key.startswith(error.key) for key in reported):
            loader.errors.append(error)
    if loader.errors:
        raise ConfigErrors(loader.errors)
    return config


def _cross_checks(config: Config) -> list[ConfigError]:
    errors = []
    leader = config.leader
    if leader.heartbeat_timeout_s >= leader.heartbeat_interval_s:
        errors.append(
            ConfigError(
                "leader.heartbeat_timeout_s",
                "must be shorter than leader.heartbeat_interval_s "
                f"({leader.heartbeat_interval_s:g}), "
                f"got {leader.heartbeat_timeout_s:g}",
            )
        )
    if leader.lease_s <= leader.heartbeat_interval_s:
        errors.append(
            ConfigError(
                "leader.lease_s",
                f"must exceed leader.heartbeat_interval_s, got {leader.lease_s:g}",
            )
        )
    if config.retry.max_s < config.retry.initial_s:
        errors.append(ConfigError("retry.max_s", "must be at least retry.initial_s"))
    dsn_problem = _dsn_problem(config.database.dsn)
    if dsn_problem:
        errors.append(ConfigError("database.dsn", dsn_problem))
    return errors + _secrets_checks(config.secrets)


def _dsn_problem(dsn: str | None) -> str | None:
    """What makes a DSN unusable, in words that never quote it (it may hold
    a password)."""
    if dsn is None:
        return None
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "not a valid postgresql:// URL (malformed host or port)"
    if parts.scheme not in ("postgres", "postgresql"):
        return "expected a postgresql:// URL"
    return None


def _secrets_checks(s: SecretsConfig) -> list[ConfigError]:
    """What each backend needs; settings of the other backends are ignored."""
    # Imported here: the cipher module builds on this one.
    from tokend.secrets.cipher import decode_key

    errors = []
    if s.backend == "postgres" and s.key is None:
        problem = "required for backend postgres (or key_env, key_file)"
        errors.append(ConfigError("secrets.key", problem))
    keys = {s.key_id: s.key, **s.old_keys} if s.backend == "postgres" else {}
    for key_id, material in keys.items():
        setting = "secrets.key" if key_id == s.key_id else f"secrets.old_keys.{key_id}"
        try:
            if material is not None:
                decode_key(material, key_id, setting)
        except ConfigError as error:
            errors.append(error)
    if s.key_id in s.old_keys:
        problem = f"{s.key_id!r} is the current key_id; list only older keys here"
        errors.append(ConfigError(f"secrets.old_keys.{s.key_id}", problem))
    if s.backend == "files" and not s.files.base:
        errors.append(ConfigError("secrets.files.base", "required for backend files"))
    if s.backend == "vault":
        if not s.vault.address:
            problem = "required for backend vault"
            errors.append(ConfigError("secrets.vault.address", problem))
        if s.vault.token is None:
            problem = "required for backend vault (or token_env, token_file)"
            errors.append(ConfigError("secrets.vault.token", problem))
    return errors


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        error = ConfigError(str(path), f"cannot read: {exc.strerror}")
        raise ConfigErrors([error]) from None
    except tomllib.TOMLDecodeError as exc:
        error = ConfigError(str(path), f"invalid TOML: {exc}")
        raise ConfigErrors([error]) from None
    except UnicodeDecodeError as exc:
        error = ConfigError(str(path), f"not UTF-8 text (byte {exc.start})")
        raise ConfigErrors([error]) from None
    return parse(data, os.environ if env is None else env, str(path))
