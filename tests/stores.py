"""Configs for the three secret stores, shared by the secret-store tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.bao import ROOT_TOKEN, Bao
from tests.helpers import make_config
from tokend.config import Config

# Configs that never touch the database still need a DSN to validate.
NO_DATABASE = "postgresql://tokend@127.0.0.1:1/unused"


def files_secrets(base: Path, **more: Any) -> dict[str, Any]:
    return {"backend": "files", "files": {"base": str(base), **more}}


def vault_secrets(
    bao: Bao, prefix: str | None = None, token: str = ROOT_TOKEN, **more: Any
) -> dict[str, Any]:
    """Vault settings under a fresh path prefix, so tests sharing one
    server never see each other's secrets."""
    prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
    vault = {
        "address": bao.address,
        "token": token,
        "app_path": f"{prefix}/app",
        "tenant_path": f"{prefix}/tenants/{{tenantId}}",
        **more,
    }
    return {"backend": "vault", "vault": vault}


def config_with(secrets: dict[str, Any], dsn: str = NO_DATABASE) -> Config:
    return make_config(dsn, secrets=secrets)
