"""The error classes of tokend, split by whose fault a failure is."""

from __future__ import annotations


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
    """A secret is missing, unreadable or cannot be decrypted.

    The message names the tenant, the secret and the key id; never a value.
    """


class TokenURLRefused(TokendError):
    """A token URL is outside the provider's allow-list; nothing was sent."""


class NotLeader(TokendError):
    """The leader lock is not (or no longer provably) held."""
