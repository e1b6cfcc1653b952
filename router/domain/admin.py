"""Aggregates of the admin log: routing rules and destinations, each versioned by its events.

Ids derive from the name given at creation, so applying the same TOML twice changes nothing.
Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_OID, UUID, uuid5

from eventsourcing.domain import Aggregate, event

ADMIN_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/admin")


def rule_id(name: str) -> UUID:
    return uuid5(ADMIN_NAMESPACE, f"rule/{name}")


def destination_id(name: str) -> UUID:
    return uuid5(ADMIN_NAMESPACE, f"destination/{name}")


class Rule(Aggregate):
    """A routing rule; its version number is the aggregate version."""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return rule_id(name)

    @event("Created")
    def __init__(
        self,
        name: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        spec: dict[str, Any],
    ) -> None:
        self.name = name
        self.spec = spec
        self.deleted = False
        self.detached = False

    @event("Updated")
    def update(
        self, *, actor: str, source_ip: str, correlation_id: str, spec: dict[str, Any]
    ) -> None:
        """The whole rule as it is from now on."""
        self.spec = spec
        self.deleted = False

    @event("Deleted")
    def delete(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """The rule no longer takes part in routing."""
        self.deleted = True

    @event("Detached")
    def detach(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """Detached from the TOML file: the file no longer overwrites or deletes it."""
        self.detached = True


class Destination(Aggregate):
    """A delivery target; secret fields of its config are sealed (AES-256-GCM) in the events."""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return destination_id(name)

    @event("Created")
    def __init__(
        self,
        name: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        config: dict[str, Any],
    ) -> None:
        self.name = name
        self.config = config
        self.deleted = False
        self.paused = False
        self.detached = False

    @event("Updated")
    def update(
        self, *, actor: str, source_ip: str, correlation_id: str, config: dict[str, Any]
    ) -> None:
        """The whole configuration as it is from now on."""
        self.config = config
        self.deleted = False

    @event("Deleted")
    def delete(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """No new deliveries are routed here; pending ones wait until it is re-created."""
        self.deleted = True

    @event("Paused")
    def pause(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """Deliveries stop being attempted (they keep queueing)."""
        self.paused = True

    @event("Resumed")
    def resume(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """Deliveries are attempted again."""
        self.paused = False

    @event("Detached")
    def detach(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """Detached from the TOML file: the file no longer overwrites or deletes it."""
        self.detached = True


def transform_id(name: str) -> UUID:
    return uuid5(ADMIN_NAMESPACE, f"transform/{name}")


class Transform(Aggregate):
    """A transform applied to copies sent to destinations (de-identify, morph, charset)."""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return transform_id(name)

    @event("Created")
    def __init__(
        self,
        name: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        spec: dict[str, Any],
    ) -> None:
        self.name = name
        self.spec = spec
        self.deleted = False

    @event("Updated")
    def update(
        self, *, actor: str, source_ip: str, correlation_id: str, spec: dict[str, Any]
    ) -> None:
        """The whole transform as it is from now on."""
        self.spec = spec
        self.deleted = False

    @event("Deleted")
    def delete(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """Destinations and rules can no longer name it."""
        self.deleted = True
