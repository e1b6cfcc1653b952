"""Aggregates of the admin log for query/retrieve: remote DICOM nodes and retrieve jobs.

A remote node is a peer AE (PACS, modality, workstation) we query and retrieve from, send
C-MOVE sub-operations to, and that may query and retrieve from us. A retrieve is one C-MOVE or
C-GET a user asked for, with its progress. Event names and this module's path are stored
topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from router.domain.admin import ADMIN_NAMESPACE


def remote_node_id(name: str) -> UUID:
    return uuid5(ADMIN_NAMESPACE, f"remote-node/{name}")


class RemoteNode(Aggregate):
    """A remote AE: ``config`` holds ae_title, host, port, services and description."""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return remote_node_id(name)

    @event("Created")
    def __init__(
        self, name: str, *, actor: str, source_ip: str, correlation_id: str,
        config: dict[str, Any],
    ) -> None:
        self.name = name
        self.config = config
        self.deleted = False
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
        """The node may no longer query or retrieve, nor be a C-MOVE destination."""
        self.deleted = True

    @event("Detached")
    def detach(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """Detached from the TOML file: the file no longer overwrites or deletes it."""
        self.detached = True


class Retrieve(Aggregate):
    """One C-MOVE or C-GET from a remote node, asked for by a user.

    ``target`` holds the Study/Series Instance UIDs sealed (AES-256-GCM): the admin log is not
    encrypted as a whole. ``message_id`` is the C-MOVE's, which the remote repeats as Move
    Originator Message ID in its C-STORE sub-operations: that ties them to this job.
    """

    @event("Requested")
    def __init__(
        self, *, actor: str, source_ip: str, correlation_id: str, node: str, node_ae: str,
        method: str, level: str, target: str, message_id: int, runner: str,
    ) -> None:
        self.user = actor
        self.correlation_id = correlation_id
        self.node = node
        self.node_ae = node_ae
        self.method = method
        self.level = level
        self.target = target
        self.message_id = message_id
        self.runner = runner
        self.status = "running"
        self.counts = {"completed": 0, "failed": 0, "warning": 0, "remaining": -1}
        self.reason = ""
        self.dimse_status: int | None = None

    @event("Progressed")
    def progress(
        self, *, actor: str, source_ip: str, correlation_id: str, completed: int, failed: int,
        warning: int, remaining: int,
    ) -> None:
        """Sub-operation counts from a pending C-MOVE/C-GET response."""
        self.counts = {"completed": completed, "failed": failed, "warning": warning,
                       "remaining": remaining}

    @event("Completed")
    def complete(
        self, *, actor: str, source_ip: str, correlation_id: str, completed: int, failed: int,
        warning: int, status: int,
    ) -> None:
        """The final response came (0x0000, or 0xB000 when some sub-operations failed)."""
        self.counts = {"completed": completed, "failed": failed, "warning": warning,
                       "remaining": 0}
        self.dimse_status = status
        self.status = "completed" if failed == 0 else "partial"

    @event("Failed")
    def fail(
        self, *, actor: str, source_ip: str, correlation_id: str, reason: str, completed: int,
        failed: int, warning: int, status: int | None,
    ) -> None:
        """Nothing or not everything was retrieved: refused, unreachable, aborted, cancelled."""
        self.counts = {"completed": completed, "failed": failed, "warning": warning,
                       "remaining": self.counts.get("remaining", -1)}
        self.dimse_status = status
        self.reason = reason
        self.status = "failed"
