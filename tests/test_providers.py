"""Provider configuration and the token-URL allow-list (no I/O)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SECRET_KEY, write_config
from tokend.config import Config, ProviderConfig, load, parse
from tokend.errors import ConfigErrors, TokenURLRefused
from tokend.providers import NINJAONE_HOSTS, Provider


def _config(**providers: dict[str, Any]) -> Config:
    doc = {"database": {"dsn": "postgresql://x"}, "secrets": {"key": SECRET_KEY}}
    return parse({**doc, "providers": providers}, {}, "test")


def _errors(**providers: Any) -> dict[str, str]:
    with pytest.raises(ConfigErrors) as caught:
        _config(**providers)
    return {e.key: e.problem for e in caught.value.errors}


def _provider(name: str = "ninjaone", **settings: Any) -> Provider:
    config = _config(**{name: settings})
    found = config.provider(name)
    assert found is not None
    return Provider(name, found)


# -- configuration ----------------------------------------------------------


def test_ninjaone_is_built_in_with_names_derived_from_it() -> None:
    ninja = _config().provider("ninjaone")
    assert ninja is not None
    assert ninja.kind == "ninjaone"
    assert ninja.token_path == "/oauth/token"
    assert ninja.credentials_secret == "ninjaone_credentials"
    assert ninja.client_id_secret == "ninjaone_client_id"
    assert ninja.client_secret_secret == "ninjaone_client_secret"


def test_generic_provider_defaults_follow_its_name() -> None:
    config = _config(acme={"token_url": "https://auth.acme.test/oauth2/token"})
    acme = config.provider("acme")
    assert acme is not None
    assert acme.kind == "oauth2"
    assert acme.client_auth == "client_secret_post"
    assert acme.scope == ""
    assert acme.credentials_secret == "acme_credentials"
    assert acme.client_id_secret == "acme_client_id"
    assert acme.client_secret_secret == "acme_client_secret"
    assert config.provider("ninjaone") is not None


def test_generic_provider_settings_are_kept() -> None:
    config = _config(
        acme={
            "token_hosts": ["*.acme.test", "Login.Acme.Test"],
            "token_path": "/v2/token",
            "client_auth": "client_secret_basic",
            "scope": "read write",
            "credentials_secret": "acme_oauth",
            "client_id": "id-1",
            "client_secret": "never-shown",
        }
    )
    acme = config.provider("acme")
    assert acme is not None
    assert acme.token_hosts == ("*.acme.test", "login.acme.test")
    assert (acme.client_auth, acme.scope) == ("client_secret_basic", "read write")
    assert acme.credentials_secret == "acme_oauth"
    assert acme.client_id_secret == "acme_client_id"
    assert "never-shown" not in repr(config)


@pytest.mark.parametrize(
    ("providers", "key", "words"),
    [
        ({"acme": {}}, "providers.acme.token_url", "token_url"),
        (
            {"acme": {"token_url": "https://a.test/t", "token_hosts": ["a.test"]}},
            "providers.acme.token_hosts",
            "not both",
        ),
        (
            {"ninjaone": {"token_url": "https://a.test/t"}},
            "providers.ninjaone.token_url",
            "only for kind oauth2",
        ),
        (
            {"ninjaone": {"token_hosts": ["a.test"]}},
            "providers.ninjaone.token_hosts",
            "only for kind oauth2",
        ),
        (
            {"acme": {"token_url": "http://127.0.0.1:9/token"}},
            "providers.acme.token_url",
            "allow_http_loopback",
        ),
        (
            {
                "acme": {
                    "token_url": "http://auth.acme.test/token",
                    "allow_http_loopback": True,
                }
            },
            "providers.acme.token_url",
            "loopback",
        ),
        (
            {"acme": {"token_url": "https://user:pw@auth.acme.test/token"}},
            "providers.acme.token_url",
            "credentials",
        ),
        (
            {"acme": {"token_url": "ftp://auth.acme.test/token"}},
            "providers.acme.token_url",
            "http(s)",
        ),
        ({"acme": {"token_hosts": ["*.com"]}}, "providers.acme.token_hosts", "broad"),
        ({"acme": {"token_hosts": ["*"]}}, "providers.acme.token_hosts", "host name"),
        (
            {"acme": {"token_hosts": ["a*.acme.test"]}},
            "providers.acme.token_hosts",
            "wildcard",
        ),
        (
            {"acme": {"token_hosts": ["https://acme.test"]}},
            "providers.acme.token_hosts",
            "scheme",
        ),
        ({"acme": {"token_hosts": []}}, "providers.acme.token_hosts", "non-empty"),
        (
            {"ninjaone": {"token_path": "oauth/token"}},
            "providers.ninjaone.token_path",
            "path",
        ),
        (
            {"ninjaone": {"token_path": "@evil.test/token"}},
            "providers.ninjaone.token_path",
            "path",
        ),
        (
            {"ninjaone": {"token_path": "/a/../token"}},
            "providers.ninjaone.token_path",
            "path",
        ),
        (
            {"ninjaone": {"client_auth": "private_key_jwt"}},
            "providers.ninjaone.client_auth",
            "client_secret_basic",
        ),
        (
            {"ninjaone": {"credentials_secret": "../etc/x"}},
            "providers.ninjaone.credentials_secret",
            "secret name",
        ),
        ({"ninjaone": {"kind": "saml"}}, "providers.ninjaone.kind", "oauth2"),
        ({"ninjaone": {"verify_tls": False}}, "providers.ninjaone.verify_tls", ""),
        ({"bad name": {}}, "providers.bad name", "provider name"),
        ({"acme": "https://a.test"}, "providers.acme", "table"),
    ],
)
def test_provider_errors_name_the_key(
    providers: dict[str, Any], key: str, words: str
) -> None:
    errors = _errors(**providers)
    assert key in errors, errors
    assert words in errors[key]


def test_check_config_exits_2_naming_the_provider_key(tmp_path: Path) -> None:
    doc = {
        "database": {"dsn": "postgresql://x"},
        "secrets": {"key": SECRET_KEY},
        "providers": {"acme": {"kind": "oauth2", "token_hosts": ["*.com"]}},
    }
    path = write_config(tmp_path / "bad.toml", doc)
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "providers.acme.token_hosts" in result.stderr


# -- NinjaOne's allow-list --------------------------------------------------


@pytest.mark.parametrize("host", sorted(NINJAONE_HOSTS))
def test_ninjaone_regions_over_https(host: str) -> None:
    url = _provider().token_url(f"https://{host}")
    assert url == f"https://{host}/oauth/token"


def test_ninjaone_token_path_is_a_setting() -> None:
    url = _provider(token_path="/ws/oauth/token").token_url("https://EU.NinjaRMM.com/")
    assert url == "https://eu.ninjarmm.com/ws/oauth/token"


@pytest.mark.parametrize(
    "instance_url",
    [
        None,
        "",
        "https://evil.test",
        "http://eu.ninjarmm.com",
        "https://eu.ninjarmm.com:8443",
        "https://eu.ninjarmm.com.evil.test",
        "https://evil-eu.ninjarmm.com",
        "https://ninjarmm.com",
        "https://eu.ninjarmm.com/api",
        "https://eu.ninjarmm.com?x=1",
        "https://user@eu.ninjarmm.com",
        "https://eu.ninjarmm.com:notaport",
        "eu.ninjarmm.com",
        "http://127.0.0.1:8080",
    ],
)
def test_ninjaone_refuses_everything_else(instance_url: str | None) -> None:
    with pytest.raises(TokenURLRefused):
        _provider().token_url(instance_url)


def test_loopback_only_by_address_and_only_with_the_setting() -> None:
    loopback = _provider(allow_http_loopback=True)
    assert loopback.token_url("http://127.0.0.1:8080") == (
        "http://127.0.0.1:8080/oauth/token"
    )
    assert loopback.token_url("http://[::1]:8080") == "http://[::1]:8080/oauth/token"
    for url in ("http://localhost:8080", "http://10.0.0.1:8080", "http://evil.test"):
        with pytest.raises(TokenURLRefused):
            loopback.token_url(url)


# -- generic providers ----------------------------------------------------------


def test_fixed_token_url_ignores_the_instance_url() -> None:
    acme = _provider("acme", token_url="https://auth.acme.test/oauth2/token")
    for instance_url in (None, "https://evil.test", "https://tenant.acme.test"):
        assert acme.token_url(instance_url) == "https://auth.acme.test/oauth2/token"


def test_host_patterns_pick_the_instance_urls_host() -> None:
    acme = _provider(
        "acme", token_hosts=["*.acme.test", "login.acme.example"], token_path="/tok"
    )
    assert acme.token_url("https://t1.acme.test") == "https://t1.acme.test/tok"
    assert acme.token_url("https://a.b.acme.test") == "https://a.b.acme.test/tok"
    assert acme.token_url("https://login.acme.example") == (
        "https://login.acme.example/tok"
    )
    refused = [
        "https://acme.test",
        "https://evilacme.test",
        "https://t1.acme.test.evil.test",
        "https://sub.login.acme.example",
        "http://t1.acme.test",
        "https://t1.acme.test:8443",
        "https://127.0.0.1",
        None,
    ]
    for url in refused:
        with pytest.raises(TokenURLRefused):
            acme.token_url(url)


def test_a_provider_config_built_by_hand_is_checked_too() -> None:
    bad = ProviderConfig(kind="oauth2", token_url="http://auth.acme.test/token")
    with pytest.raises(TokenURLRefused, match="loopback"):
        Provider("acme", bad).token_url(None)


# -- the documented examples ---------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _examples() -> list[str]:
    """The commented provider examples of config.example.toml, uncommented,
    and the TOML block of docs/providers.md."""
    example = (ROOT / "config.example.toml").read_text()
    commented = example[example.index("# [providers.acme]") :].splitlines()
    uncommented = "\n".join(line.removeprefix("#").strip() for line in commented)
    doc = (ROOT / "docs" / "providers.md").read_text()
    block = doc[doc.index("```toml\n") + 8 :]
    return [uncommented, block[: block.index("```")]]


@pytest.mark.parametrize("snippet", _examples(), ids=["config.example", "docs"])
def test_documented_provider_examples_are_valid(snippet: str) -> None:
    doc = tomllib.loads(snippet)
    base = {"database": {"dsn": "postgresql://x"}, "secrets": {"key": SECRET_KEY}}
    config = parse({**base, **doc}, {"ACME_CLIENT_SECRET": "x"}, "docs")
    assert {"acme", "vendor", "ninjaone"} <= set(config.providers)


def test_example_config_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "config.example.toml").read_text()
    key_file = tmp_path / "secret.key"
    key_file.write_text(SECRET_KEY)
    path = tmp_path / "config.toml"
    path.write_text(text.replace("/etc/tokend/secret.key", str(key_file)))
    config = load(path, {"TOKEND_DATABASE_DSN": "postgresql://x"})
    assert set(config.providers) == {"ninjaone"}
