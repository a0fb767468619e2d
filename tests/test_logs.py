"""Log lines: JSON shape, context fields, redaction and the text form."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tokend import logs
from tokend.logs import REDACTED, configure_logging, fields, set_level

ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

log = logging.getLogger("tokend.test")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_fixed_keys_then_context(out: io.StringIO) -> None:
    tenant = uuid.uuid4()

    log.info(
        "refresh %s",
        "succeeded",
        extra=fields(tenant=tenant, integration_id="i-1", provider="ninjaone", nonce=7),
    )

    [line] = lines(out)
    assert list(line)[:4] == ["ts", "level", "logger", "message"]
    assert ISO_MS_UTC.match(line["ts"])
    assert line["level"] == "info"
    assert line["logger"] == "tokend.test"
    assert line["message"] == "refresh succeeded"
    assert line["tenant"] == str(tenant)
    assert line["integration_id"] == "i-1"
    assert line["provider"] == "ninjaone"
    assert line["nonce"] == 7
    assert "exc" not in line


def test_every_extra_key_is_kept_and_odd_values_become_strings(
    out: io.StringIO,
) -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    log.warning(
        "odd values",
        extra={"anything": Opaque(), "huge": 2**70, "items": [1, "a"], "ok": True},
    )

    [line] = lines(out)
    assert line["anything"] == "opaque!"
    assert line["huge"] == str(2**70)
    assert line["items"] == [1, "a"]
    assert line["ok"] is True


def test_exception_traceback_goes_to_exc(out: io.StringIO) -> None:
    try:
        raise RuntimeError("token endpoint unreachable")
    except RuntimeError:
        log.exception("refresh failed", extra=fields(provider="ninjaone"))

    [line] = lines(out)
    assert line["level"] == "error"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: token endpoint unreachable" in line["exc"]


def test_each_record_is_one_line(out: io.StringIO) -> None:
    log.info("first\nsecond", extra=fields(note="a\nb"))

    assert len(out.getvalue().splitlines()) == 1


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "access_token",
        "refresh_token",
        "client_secret",
        "secret",
        "password",
        "Authorization",
        "credentials",
    ],
)
def test_secret_named_fields_are_redacted(out: io.StringIO, key: str) -> None:
    log.info("with a secret", extra={key: "s3cr3t-value"})

    [line] = lines(out)
    assert line[key] == REDACTED
    assert "s3cr3t-value" not in out.getvalue()


def test_nested_secrets_are_redacted_and_the_rest_kept(out: io.StringIO) -> None:
    @dataclasses.dataclass
    class Credentials:
        access_token: str
        expires_at: int

    reply = {"access_token": "a-secret", "expires_in": 3600, "scope": "monitoring"}
    log.info(
        "provider reply",
        extra=fields(reply=reply, creds=Credentials("c-secret", 1700000000000)),
    )

    [line] = lines(out)
    assert line["reply"] == {
        "access_token": REDACTED,
        "expires_in": 3600,
        "scope": "monitoring",
    }
    assert line["creds"] == {"access_token": REDACTED, "expires_at": 1700000000000}
    assert "secret" not in out.getvalue().replace("[redacted]", "")


def test_counts_under_secret_like_names_stay_readable(out: io.StringIO) -> None:
    log.info("tokens", extra=fields(tokens_expired=3, token_rotated=True))

    [line] = lines(out)
    assert line["tokens_expired"] == 3
    assert line["token_rotated"] is True


def test_secrets_inside_text_are_scrubbed(out: io.StringIO) -> None:
    bearer = "eyJhbGciOiJIUzI1NiJ9.payload.signature"
    try:
        raise ValueError(
            f"sent refresh_token=r-secret&client_secret=c-secret, bearer {bearer}"
        )
    except ValueError as exc:
        log.exception(
            "failed with Authorization: Bearer %s",
            bearer,
            extra=fields(error=str(exc), body='{"access_token": "a-secret"}'),
        )

    text = out.getvalue()
    for secret in ("r-secret", "c-secret", "a-secret", bearer):
        assert secret not in text
    [line] = lines(out)
    assert line["message"] == f"failed with Authorization: Bearer {REDACTED}"


def test_prose_is_not_mistaken_for_a_secret(out: io.StringIO) -> None:
    log.info("basic auth chosen for the bearer of bad news")

    [line] = lines(out)
    assert line["message"] == "basic auth chosen for the bearer of bad news"


def test_text_format_is_one_readable_line() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)

    log.info(
        "refresh succeeded",
        extra=fields(tenant="t-1", provider="ninjaone", reason="rate limited", n=2),
    )

    [line] = stream.getvalue().splitlines()
    assert re.match(
        r"^\S+Z INFO +tokend\.test: refresh succeeded "
        r'tenant=t-1 provider=ninjaone reason="rate limited" n=2$',
        line,
    )


def test_text_format_redacts_and_appends_the_traceback() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)

    try:
        raise KeyError("boom")
    except KeyError:
        log.exception("failed", extra=fields(refresh_token="r-secret"))

    first, *rest = stream.getvalue().splitlines()
    assert first.endswith(f"refresh_token={REDACTED}")
    assert rest[0].startswith("Traceback")
    assert "r-secret" not in stream.getvalue()


@pytest.mark.parametrize(
    ("stream", "expect_json"), [(io.StringIO(), True), (Tty(), False)]
)
def test_auto_is_text_on_a_terminal_and_json_elsewhere(
    stream: io.StringIO, expect_json: bool
) -> None:
    configure_logging("info", "auto", stream=stream)

    log.info("hello")

    assert stream.getvalue().startswith("{") is expect_json


def test_set_level_changes_what_is_logged(out: io.StringIO) -> None:
    log.debug("shown")
    set_level("WARNING")
    log.info("hidden")
    log.warning("shown too")

    assert [line["message"] for line in lines(out)] == ["shown", "shown too"]


def test_reconfiguring_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)

    configure_logging("info", "json", stream=io.StringIO())
    configure_logging("info", "text", stream=io.StringIO())

    assert len(root.handlers) == before + 1


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "yaml")])
def test_bad_level_or_format_is_refused(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, stream=io.StringIO())


def test_fields_drops_none_and_refuses_reserved_names() -> None:
    assert fields(tenant="t", provider=None) == {"tenant": "t"}

    with pytest.raises(ValueError, match="msg"):
        fields(msg="clash")
    with pytest.raises(ValueError, match="level"):
        fields(level="clash")


def test_raw_extra_cannot_overwrite_the_fixed_keys(out: io.StringIO) -> None:
    log.info("real message", extra={"ts": "fake", "level": "fake"})

    [line] = lines(out)
    assert line["level"] == "info"
    assert line["ctx_ts"] == "fake"
    assert line["ctx_level"] == "fake"


def test_parse_level_accepts_any_case() -> None:
    assert logs.parse_level(" Debug ") == logging.DEBUG
