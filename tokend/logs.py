"""Logging setup: one JSON object a line, or a readable text line on a terminal.

Modules log a fixed message and pass their context as fields::

    logger.info("refresh succeeded", extra=fields(tenant=t, provider=p, nonce=n))

Every field becomes a key of the JSON object (or a ``key=value`` pair of the
text line). The formatters redact the values of fields whose names look like
they hold a secret, so a slip at a call site does not put a token in the logs.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final, Literal, TextIO

import orjson

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "configure_logging",
    "fields",
    "parse_level",
    "redact",
    "scrub",
    "set_level",
]

logger = logging.getLogger(__name__)

LogFormat = Literal["json", "text", "auto"]

REDACTED: Final = "[redacted]"

_LEVELS: Final = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

_FORMATS: Final = ("json", "text", "auto")

# How deep redact() follows nested values; deeper ones (or a value that
# contains itself) are logged as a placeholder rather than recursing forever.
_MAX_DEPTH: Final = 8

# Values that JSON renders faithfully and that cannot hide a credential.
_PLAIN_TYPES: Final = (bool, int, float, date, time, timedelta, uuid.UUID, enum.Enum)

# Attributes every LogRecord has; whatever else a record carries came from
# ``extra=`` and is context. Read off a real record so that attributes added
# by newer Pythons (taskName in 3.12) are known without listing them.
_RECORD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}

# Keys of the JSON object that context fields may not take over.
_OWN_KEYS: Final = frozenset({"ts", "level", "logger", "message", "exc", "stack"})

# Field names whose values are never logged (the names in the design's
# credentials and the HTTP header that carries them).
_SECRET_KEY = re.compile(
    r"token|secret|password|passwd|authorization|credential", re.IGNORECASE
)

# Secrets that can hide inside free text (an exception message that quotes a
# request, say): an Authorization header value, and OAuth2 parameters in form
# or JSON bodies. Header values must be long enough to be credentials, so that
# prose such as "basic auth" stays intact.
_SECRET_TEXT = re.compile(
    r"(?P<head>\b(?:bearer|basic)\s+)(?=[\w.~+/=-]{16})(?P<value>[\w.~+/=-]+)"
    r"|(?P<param>\b(?:access_token|refresh_token|id_token|client_secret|password)"
    r"""["']?\s*[:=]\s*["']?)(?P<pvalue>[^\s"'&,;}]+)""",
    re.IGNORECASE,
)

# The handler this module installed, so that reconfiguring replaces it and
# leaves alone the handlers of others (pytest's log capture, for one).
_handler: logging.Handler | None = None


def fields(**context: object) -> dict[str, object]:
    """Context for ``extra=``, checked against the names logging reserves.

    Fields whose value is None are left out, so optional context can be passed
    as it is. Values need not be JSON types: anything else is logged as str().
    """
    clashes = sorted((_RECORD_ATTRS | _OWN_KEYS) & context.keys())
    if clashes:
        raise ValueError(f"log field names reserved by logging: {', '.join(clashes)}")

    return {key: value for key, value in context.items() if value is not None}


def redact(key: str, value: object, *, _depth: int = 0) -> object:
    """The value to log for a field called ``key``, with any secret replaced.

    Numbers, booleans, times and ids pass: they cannot carry a credential, and
    counts such as ``tokens_expired`` stay readable. Mappings, sequences and
    dataclasses are redacted member by member, so a parsed provider reply can be
    logged safely. Any other object is logged as its scrubbed ``str()``.
    """
    if value is None or isinstance(value, _PLAIN_TYPES):
        return value

    if _SECRET_KEY.search(key):
        return REDACTED

    if isinstance(value, str):
        return scrub(value)

    if _depth >= _MAX_DEPTH:
        return "[too deep]"
    depth = _depth + 1

    if isinstance(value, Mapping):
        return {str(k): redact(str(k), v, _depth=depth) for k, v in value.items()}

    if isinstance(value, list | tuple | set | frozenset):
        return [redact(key, item, _depth=depth) for item in value]

    # orjson would write a dataclass out field by field, secrets included.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: redact(f.name, getattr(value, f.name), _depth=depth)
            for f in dataclasses.fields(value)
        }

    return scrub(str(value))


def scrub(text: str) -> str:
    """Replace bearer credentials and token parameters inside free text."""
    return _SECRET_TEXT.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    return (match.group("head") or match.group("param")) + REDACTED


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {
        key: redact(key, value)
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Formatter(logging.Formatter):
    """Shared pieces: redacted message, context and traceback of a record."""

    def parts(
        self, record: logging.LogRecord
    ) -> tuple[str, dict[str, object], str | None]:
        message = scrub(record.getMessage())

        # Cache the traceback on the record as logging.Formatter does, so that
        # other handlers reuse it.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        exc = scrub(record.exc_text) if record.exc_text else None

        return message, _context(record), exc


class JsonFormatter(_Formatter):
    """One JSON object a line: ts, level, logger, message, context, exc."""

    def format(self, record: logging.LogRecord) -> str:
        message, context, exc = self.parts(record)

        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in context.items():
            # A raw ``extra=`` that bypassed fields() may reuse a fixed key.
            line[f"ctx_{key}" if key in _OWN_KEYS else key] = value
        if exc:
            line["exc"] = exc
        if record.stack_info:
            line["stack"] = scrub(record.stack_info)

        return _dumps(line)


def _dumps(value: object) -> str:
    try:
        return _encode(value)
    except orjson.JSONEncodeError:
        # orjson refuses some values outright (integers past 64 bits, deep
        # nesting) without asking ``default``; the line must still come out, so
        # only the offending values fall back to their str().
        if isinstance(value, dict):
            return _encode({str(k): _encodable(v) for k, v in value.items()})
        return _encode(str(value))


def _encode(value: object) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _encodable(value: object) -> object:
    try:
        _encode(value)
    except orjson.JSONEncodeError:
        return str(value)
    return value


class TextFormatter(_Formatter):
    """``ts LEVEL logger: message key=value ...``, traceback on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        message, context, exc = self.parts(record)

        head = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {message}"
        pairs = " ".join(
            f"{key}={_text_value(value)}" for key, value in context.items()
        )
        line = f"{head} {pairs}" if pairs else head
        if exc:
            line = f"{line}\n{exc}"
        if record.stack_info:
            line = f"{line}\n{scrub(record.stack_info)}"

        return line


def _text_value(value: object) -> str:
    text = _dumps(value) if isinstance(value, Mapping | list | tuple) else str(value)

    # Quote what would otherwise run into the next pair or read ambiguously.
    if not text or any(c.isspace() or c in '"=' for c in text):
        return orjson.dumps(text).decode()
    return text


def parse_level(level: str) -> int:
    """The logging level called ``level`` (any case); ValueError if unknown."""
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        known = ", ".join(_LEVELS)
        raise ValueError(
            f"unknown log level {level!r}; expected one of {known}"
        ) from None


def configure_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Send all logs to ``stream`` (stderr) at ``level`` in the format ``fmt``.

    ``fmt`` is "json", "text" or "auto": text when the stream is a terminal,
    JSON otherwise (journald, containers, files). Calling it again replaces the
    handler it installed before.
    """
    global _handler

    numeric_level = parse_level(level)
    if fmt not in _FORMATS:
        raise ValueError(
            f"unknown log format {fmt!r}; expected one of json, text, auto"
        )
    out = sys.stderr if stream is None else stream

    use_text = fmt == "text" or (fmt == "auto" and _isatty(out))
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter() if use_text else JsonFormatter())

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _handler = handler


def set_level(level: str) -> None:
    """Change the level of every logger that inherits the root's (on reload)."""
    logging.getLogger().setLevel(parse_level(level))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # A closed or unusual stream is no terminal.
        return False
