"""Providers: which token URLs an integration may use, and how to ask them.

A token URL is only ever built from a provider's allow-list: an
`instance_url` outside it is refused before any request, so a client secret
never leaves for an unknown host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from tokend.config import ProviderConfig
from tokend.errors import TokenURLRefused

NINJAONE_HOSTS = frozenset(
    f"{region}.ninjarmm.com" for region in ("app", "us2", "eu", "ca", "oc")
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Provider:
    name: str
    config: ProviderConfig

    def token_url(self, instance_url: str | None) -> str:
        """The token URL for an integration, or TokenURLRefused saying why."""
        if self.config.kind == "ninjaone":
            return self._ninjaone_url(instance_url)
        return self._listed_url(instance_url)

    def _ninjaone_url(self, instance_url: str | None) -> str:
        if not instance_url:
            raise TokenURLRefused("the integration has no instance_url")
        base = self._origin(instance_url, "instance_url")
        host = urlsplit(base).hostname or ""
        if (
            base.startswith("https://")
            and host in NINJAONE_HOSTS
            and ":" not in base[8:]
        ):
            return base + self.config.token_path
        if self._loopback_allowed(base):
            return base + self.config.token_path
        raise TokenURLRefused(
            f"instance_url host {host!r} is not a NinjaOne region "
            f"({', '.join(sorted(NINJAONE_HOSTS))}) over https"
        )

    def _listed_url(self, instance_url: str | None) -> str:
        urls = self.config.token_urls
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme == "https" or self._loopback_allowed(url):
                return url
        raise TokenURLRefused(
            f"provider {self.name!r} has no usable token URL (https, or http to "
            f"loopback with allow_http_loopback)"
        )

    def _loopback_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        return (
            self.config.allow_http_loopback
            and parts.scheme == "http"
            and is_loopback(parts.hostname or "")
        )

    @staticmethod
    def _origin(url: str, what: str) -> str:
        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise TokenURLRefused(f"{what} is not a valid URL") from None
        if parts.username or parts.password:
            raise TokenURLRefused(f"{what} must not carry credentials")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise TokenURLRefused(f"{what} must be a bare origin, got a path")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TokenURLRefused(f"{what} must be an http(s) origin")
        return f"{parts.scheme}://{parts.netloc}".lower()
