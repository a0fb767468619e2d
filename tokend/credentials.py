"""The credentials secret of an integration: JSON with the token set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# Year 2286 in milliseconds: anything later is garbage (or seconds times
# a thousand twice), and would not survive conversion to a timestamp.
MAX_EXPIRES_AT_MS = 10**13


class CredentialsInvalid(ValueError):
    """The stored credentials are not the JSON object tokend expects.

    Messages name the field, never its value.
    """


@dataclass(frozen=True)
class Credentials:
    access_token: str
    refresh_token: str
    expires_at_ms: int
    instance_url: str | None
    extra: dict[str, Any]

    def __repr__(self) -> str:
        return f"Credentials(expires_at_ms={self.expires_at_ms}, <tokens hidden>)"

    @property
    def expires_at(self) -> float:
        return self.expires_at_ms / 1000

    @classmethod
    def parse(cls, raw: bytes) -> Credentials:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CredentialsInvalid("not JSON") from None
        if not isinstance(doc, dict):
            raise CredentialsInvalid("not a JSON object")
        for name in ("access_token", "refresh_token"):
            if not isinstance(doc.get(name), str) or not doc[name]:
                raise CredentialsInvalid(f"{name}: missing or not a string")
        expires = doc.get("expires_at")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise CredentialsInvalid("expires_at: missing or not milliseconds")
        if not 0 < expires < MAX_EXPIRES_AT_MS:
            raise CredentialsInvalid("expires_at: out of range (milliseconds)")
        instance_url = doc.get("instance_url")
        known = ("access_token", "refresh_token", "expires_at", "instance_url")
        return cls(
            access_token=doc["access_token"],
            refresh_token=doc["refresh_token"],
            expires_at_ms=int(expires),
            instance_url=instance_url if isinstance(instance_url, str) else None,
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def dumps(self) -> bytes:
        doc = dict(self.extra)
        doc.update(
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=self.expires_at_ms,
        )
        if self.instance_url is not None:
            doc["instance_url"] = self.instance_url
        return orjson.dumps(doc)
