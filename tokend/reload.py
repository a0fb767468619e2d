"""What a reload of the config file may change while the daemon runs.

Settings bound at start (the database and its pool, the leader lock and its
connection, the LISTEN channel, the HTTP socket, the instance id) keep their
running values; a reload logs their changes as needing a restart. The secret
store judges its own settings (`SecretStore.reload`). Everything else
applies at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tokend.config import Config
from tokend.lifecycle import iso

# Settings bound at start into connections, sockets, keys and the cipher: a
# reload logs their changes as needing a restart and keeps the running values.
# None: the whole section.
RESTART_ONLY: dict[str, frozenset[str] | None] = {
    "database": None,
    "leader": None,
    "notify": None,
    "http": None,
    "daemon": frozenset({"instance_id", "state_dir", "journal_key"}),
}


def split_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload applies, and the changed keys that need a restart.

    Only key names are returned: a changed DSN or key must not reach a log.
    """
    kept: dict[str, Any] = {}
    restart: list[str] = []
    for section, only in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        keep = {
            f.name: getattr(before, f.name)
            for f in dataclasses.fields(before)
            if (only is None or f.name in only)
            and getattr(before, f.name) != getattr(after, f.name)
        }
        if keep:
            restart += [f"{section}.{name}" for name in keep]
            kept[section] = dataclasses.replace(after, **keep)
    return dataclasses.replace(new, **kept), restart


@dataclass(frozen=True)
class ReloadRecord:
    """The outcome of the last reload, for /status and the logs."""

    at: float
    result: str
    errors: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "result": self.result,
            "errors": list(self.errors),
            "changed": list(self.changed),
            "restart_needed": list(self.restart_needed),
        }


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose values differ (names only, never values)."""
    changed: list[str] = []
    for section in dataclasses.fields(Config):
        if section.name in ("providers", "source"):
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        changed += [
            f"{section.name}.{f.name}"
            for f in dataclasses.fields(before)
            if getattr(before, f.name) != getattr(after, f.name)
        ]
    for name in sorted(set(old.providers) | set(new.providers)):
        if old.providers.get(name) != new.providers.get(name):
            changed.append(f"providers.{name}")
    return changed


# The scheduler settings a deadline is computed from.
_POLICY_KEYS = ("buffer_s", "min_delay_s", "spread_s")


def policy_changed(old: Config, new: Config) -> bool:
    """Whether deadlines computed under `old` are wrong under `new`."""
    return any(
        getattr(old.scheduler, key) != getattr(new.scheduler, key)
        for key in _POLICY_KEYS
    )
