"""The RuntimeSettings aggregate of the admin log: the few settings an admin changes while the
router runs (storage retention days). Everything else comes from the TOML file or environment.

There is one such aggregate (a fixed id). A value of None means "back to the file's value".
Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from router.domain.admin import ADMIN_NAMESPACE

RUNTIME_SETTINGS_ID = uuid5(ADMIN_NAMESPACE, "runtime-settings")


class RuntimeSettings(Aggregate):
    """Values that override the configuration file, each changed by a named user."""

    @staticmethod
    def create_id(**_: Any) -> UUID:
        return RUNTIME_SETTINGS_ID

    @event("Created")
    def __init__(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        self.values: dict[str, Any] = {}

    @event("Changed")
    def change(
        self, *, actor: str, source_ip: str, correlation_id: str, name: str, value: Any,
        previous: Any,
    ) -> None:
        """The setting ``name`` is ``value`` from now on (None: the file's value again)."""
        if value is None:
            self.values.pop(name, None)
        else:
            self.values[name] = value
