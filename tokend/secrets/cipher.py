"""AES-256-GCM for the Postgres store: a keyring by key id.

Each ciphertext is bound to its tenant and name as additional data, so a
row copied to another tenant or name fails to open. New values are sealed
with the current key; every configured key opens what it sealed, which is
what lets `tokend secrets rotate-key` move rows to a new key while the
daemon runs. Errors name the key id, never the material.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokend.config import SecretsConfig
from tokend.errors import ConfigError, SecretUnavailable


def decode_key(text: str, key_id: str, setting: str = "secrets.key") -> bytes:
    """A base64 AES-256 key; errors name the key id, never the material."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        problem = f"key {key_id!r} is not valid base64"
        raise ConfigError(setting, problem) from None
    if len(key) != 32:
        raise ConfigError(setting, f"key {key_id!r} must be 32 bytes, got {len(key)}")
    return key


class Cipher:
    """AES-256-GCM with the tenant and name bound in as additional data."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ConfigError("secrets.key_id", f"no key with id {current!r}")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = current

    @classmethod
    def from_config(cls, config: SecretsConfig) -> Cipher:
        if config.key is None:
            raise ConfigError("secrets.key", "required for backend postgres")
        keys = {config.key_id: decode_key(config.key, config.key_id)}
        for key_id, text in config.old_keys.items():
            keys[key_id] = decode_key(text, key_id, f"secrets.old_keys.{key_id}")
        return cls(keys, config.key_id)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @staticmethod
    def _aad(tenant: UUID, name: str) -> bytes:
        return tenant.bytes + name.encode()

    def encrypt(
        self, tenant: UUID, name: str, value: bytes
    ) -> tuple[str, bytes, bytes]:
        nonce = os.urandom(12)
        sealed = self._keys[self.current].encrypt(nonce, value, self._aad(tenant, name))
        return self.current, nonce, sealed

    def decrypt(
        self, tenant: UUID, name: str, key_id: str, nonce: bytes, sealed: bytes
    ) -> bytes:
        aead = self._keys.get(key_id)
        if aead is None:
            # A config problem, not the row's: configure the key and reload.
            raise SecretUnavailable(
                f"secret {name!r} of tenant {tenant} is sealed with key id "
                f"{key_id!r}, which is not configured (secrets.key or "
                "secrets.old_keys)",
                code="secret_key_unknown",
            )
        try:
            return aead.decrypt(nonce, sealed, self._aad(tenant, name))
        except InvalidTag:
            raise SecretUnavailable(
                f"secret {name!r} of tenant {tenant} does not open with key "
                f"{key_id!r} (a different key under that id, or the row was "
                "altered or moved)",
                code="secret_key_mismatch",
            ) from None
