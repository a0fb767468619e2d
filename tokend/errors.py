"""The error classes of tokend, split by whose fault a failure is."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class TokendError(Exception):
    """Root of every error tokend raises on purpose."""


class ConfigError(TokendError):
    """The operator's configuration is wrong; `key` names the setting to fix."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ConfigErrors(TokendError):
    """Every problem found while validating one configuration file."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class UpstreamError(TokendError):
    """Postgres, the secret store or a token endpoint failed."""


class DatabaseError(UpstreamError):
    """Postgres could not be reached or refused a statement."""


class SecretError(UpstreamError):
    """One secret is unusable as stored (not a regular file, too large, no
    such key in its Vault data) or its name is refused.

    The message names the tenant, the secret, the path or the key id; never
    a value.
    """


class SecretUnavailable(UpstreamError):
    """The secret store cannot answer now: denied, sealed, down, a key that
    is not configured, or a concurrent writer. The integration waits and
    retries with backoff; fixing the store (or the config, then SIGHUP)
    heals it without anyone reconnecting. `code` says which.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class SecretConflict(SecretUnavailable):
    """Someone else wrote the secret since it was read; nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="secret_write_conflict")


class TokenURLRefused(TokendError):
    """A token URL is outside the provider's allow-list; nothing was sent."""


class NotLeader(TokendError):
    """The leader lock is not (or no longer provably) held."""


class JournalError(TokendError):
    """The local write-ahead journal cannot be written (disk full, I/O error)."""


def first_of(group: BaseExceptionGroup[E]) -> E:
    """The first leaf of a (nested) exception group, to re-raise it alone."""
    first = group.exceptions[0]
    return first_of(first) if isinstance(first, BaseExceptionGroup) else first
