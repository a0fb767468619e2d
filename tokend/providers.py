"""Providers: which token URLs an integration may use.

A token URL is only ever taken from a provider's allow-list, so a client
secret never leaves for an unknown host. There are three ways to a URL:

- NinjaOne (`kind = "ninjaone"`): the integration's instance_url, which must
  be one of the built-in regions over https, plus the provider's token_path;
- a generic provider with `token_url`: that one fixed URL for every
  integration, whatever its instance_url says;
- a generic provider with `token_hosts`: the integration's instance_url,
  whose host must match one of the patterns, plus token_path.

Host patterns are an exact host (`auth.example.com`, or an IP address) or
a suffix (`*.example.com`: any host ending in `.example.com`, at any depth,
but not `example.com` itself). https only, on the default port. With
`allow_http_loopback` the loopback addresses (127.0.0.0/8, ::1, written as
addresses: a name would need a lookup) are allowed too, over http or https
and on any port; it exists for tests and demos.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from tokend.errors import TokenURLRefused

if TYPE_CHECKING:
    from tokend.config import ProviderConfig

NINJAONE_REGIONS = ("app", "us2", "eu", "ca", "oc")
NINJAONE_HOSTS = frozenset(f"{region}.ninjarmm.com" for region in NINJAONE_REGIONS)

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address literal (names are not trusted:
    resolving one could lead anywhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_pattern(value: object) -> str:
    """A validated, lowercased host pattern; ValueError saying what is wrong."""
    if not isinstance(value, str) or not value:
        raise ValueError("a host pattern is a non-empty string")
    text = value.strip().lower()
    suffix = text.removeprefix("*.")
    if _is_ip(text):
        return text
    if not _DNS_NAME.fullmatch(suffix):
        raise ValueError(
            f"{value!r} is not a host name or `*.` followed by one "
            "(no scheme, port, path or other wildcard)"
        )
    if suffix != text and suffix.count(".") < 1:
        raise ValueError(f"{value!r} is too broad: the suffix needs two labels")
    return text


def host_matches(host: str, patterns: frozenset[str] | tuple[str, ...]) -> bool:
    for pattern in patterns:
        # Hosts are validated names, so a suffix match has a label before it.
        if host == pattern or (pattern[:2] == "*." and host.endswith(pattern[1:])):
            return True
    return False


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int | None

    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://{host}{port}"


def parse_url(url: str, what: str, *, bare: bool) -> Origin:
    """Scheme, host and port of an http(s) URL; `bare` refuses any path."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise TokenURLRefused(f"{what} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TokenURLRefused(f"{what} must be an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise TokenURLRefused(f"{what} must not carry credentials")
    if parts.fragment or (bare and (parts.path not in ("", "/") or parts.query)):
        part = "a fragment" if parts.fragment else "a path"
        raise TokenURLRefused(f"{what} must be a bare origin, got {part}")
    host = parts.hostname.lower()
    if not _is_ip(host) and not _DNS_NAME.fullmatch(host):
        raise TokenURLRefused(f"{what} has an unusable host name")
    return Origin(parts.scheme, host, port)


def _allowed(origin: Origin, patterns: frozenset[str], loopback_ok: bool) -> bool:
    if loopback_ok and is_loopback(origin.host):
        return True
    return (
        origin.scheme == "https"
        and origin.port in (None, 443)
        and host_matches(origin.host, patterns)
    )


def check_token_url(url: str, allow_http_loopback: bool) -> str:
    """A fixed token URL from the config: https, or http to a loopback address
    with allow_http_loopback. ValueError saying what is wrong."""
    try:
        origin = parse_url(url, "token_url", bare=False)
    except TokenURLRefused as exc:
        raise ValueError(str(exc)) from None
    if origin.scheme == "http" and not (
        allow_http_loopback and is_loopback(origin.host)
    ):
        raise ValueError(
            "plain http is allowed only to a loopback address, and only with "
            f"allow_http_loopback = true; got {origin.base()}"
        )
    return url


@dataclass(frozen=True)
class Provider:
    name: str
    config: ProviderConfig

    def token_url(self, instance_url: str | None) -> str:
        """The token URL for an integration, or TokenURLRefused saying why."""
        config = self.config
        if config.kind == "oauth2" and config.token_url:
            try:
                return check_token_url(config.token_url, config.allow_http_loopback)
            except ValueError as exc:
                raise TokenURLRefused(str(exc)) from None
        if config.kind == "ninjaone":
            patterns, described = NINJAONE_HOSTS, "a NinjaOne region"
        else:
            patterns = frozenset(config.token_hosts)
            described = f"allowed for provider {self.name!r}"
        if not instance_url:
            raise TokenURLRefused("the integration has no instance_url")
        origin = parse_url(instance_url, "instance_url", bare=True)
        if not _allowed(origin, patterns, config.allow_http_loopback):
            listed = ", ".join(sorted(patterns))
            raise TokenURLRefused(
                f"instance_url {origin.base()!r} is not {described} "
                f"({listed}) over https on the default port"
            )
        return origin.base() + config.token_path
