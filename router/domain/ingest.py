"""Aggregates of the ingest log: one Job per receipt, one Instance per SOP Instance UID,
one ReceiptFailure per refused object. Saved together with the routing decision.

Event class names and this module's path are stored topics: do not rename or move them.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_OID, UUID, uuid5

from eventsourcing.domain import Aggregate, event

INSTANCE_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/instance")


class Job(Aggregate):
    """One received object (C-STORE, STOW-RS or retrieve) and what was decided about it."""

    @event("Received")
    def __init__(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        source: str,
        calling_aet: str,
        called_aet: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        sha256: str,
        size: int,
        index: dict[str, Any],
        previous_job_id: str | None,
        tls_subject: str = "",
        repaired_uids: dict[str, str] | None = None,
        node: str = "",
    ) -> None:
        """``tls_subject``: the sender's verified TLS certificate subject ("" over plain TCP,
        and absent in events recorded before DICOM TLS). ``repaired_uids``: keyword -> the
        original of each UID replaced under ``[ingest] invalid_uids = "repair"`` (the object
        is stored with the new ones; absent or None when nothing was repaired). ``node``:
        the router node that received it (absent in events recorded before several nodes)."""
        self.actor = actor
        self.source_ip = source_ip
        self.correlation_id = correlation_id
        self.source = source
        self.calling_aet = calling_aet
        self.called_aet = called_aet
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax_uid = transfer_syntax_uid
        self.sha256 = sha256
        self.size = size
        self.index = index
        self.previous_job_id = previous_job_id
        self.tls_subject = tls_subject
        self.repaired_uids = repaired_uids
        self.node = node
        self.destinations: list[str] = []
        self.duplicate_of: str | None = None
        self.blob_purged = False

    @event("Routed")
    def route(
        self,
        units: list[dict[str, Any]] | None = None,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        matched_rules: list[dict[str, Any]],
        destinations: list[str],
        unrouted: bool,
        default_destination_used: bool,
        stopped_by: str | None,
    ) -> None:
        """The rules that matched (id, version, name) and the destinations chosen; ``units``
        names the destinations held for a series or study unit (absent in older events)."""
        self.destinations = list(destinations)

    @event("DuplicateIgnored")
    def ignore_duplicate(
        self, *, actor: str, source_ip: str, correlation_id: str, original_job_id: str
    ) -> None:
        """Same SOP Instance UID with identical content: recorded, not delivered again."""
        self.duplicate_of = original_job_id

    @event("ConflictKept")
    def keep_conflict(
        self, *, actor: str, source_ip: str, correlation_id: str, original_job_id: str
    ) -> None:
        """Same UID, other content, policy keep_first: stored and recorded, not routed."""
        self.duplicate_of = original_job_id

    @event("Rerouted")
    def reroute(
        self,
        units: list[dict[str, Any]] | None = None,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        matched_rules: list[dict[str, Any]],
        destinations: list[str],
        reason: str = "",
    ) -> None:
        """The job was routed again: by an AI processor's result tags, or sent by a user to a
        destination (no matched rules; ``reason`` as given, absent in older events). New
        destinations are added, none removed."""
        self.destinations = sorted(set(self.destinations) | set(destinations))

    @event("BlobPurged")
    def purge_blob(
        self, *, actor: str, source_ip: str, correlation_id: str, sha256: str, size: int,
        reason: str,
    ) -> None:
        """Retention deleted the stored object of this fully delivered job (events stay)."""
        self.blob_purged = True


class Instance(Aggregate):
    """The versions stored under one SOP Instance UID (id derived from the UID)."""

    @staticmethod
    def create_id(sop_instance_uid: str, **_: Any) -> UUID:
        return instance_id(sop_instance_uid)

    @event("Registered")
    def __init__(
        self,
        sop_instance_uid: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        job_id: str,
        sha256: str,
    ) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.versions: list[dict[str, str]] = [{"job_id": job_id, "sha256": sha256}]

    @event("VersionAdded")
    def add_version(
        self, *, actor: str, source_ip: str, correlation_id: str, job_id: str, sha256: str
    ) -> None:
        """Another content arrived under this UID and was kept as a new version."""
        self.versions.append({"job_id": job_id, "sha256": sha256})

    def job_with(self, sha256: str) -> str | None:
        """The job that first stored this exact content, if any."""
        for version in self.versions:
            if version["sha256"] == sha256:
                return version["job_id"]
        return None

    @property
    def latest_job_id(self) -> str:
        return self.versions[-1]["job_id"]


def instance_id(sop_instance_uid: str) -> UUID:
    return uuid5(INSTANCE_NAMESPACE, sop_instance_uid)


class ReceiptFailure(Aggregate):
    """An object that was not accepted (answered with a failure status); nothing was indexed."""

    @event("Recorded")
    def __init__(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        source: str,
        calling_aet: str,
        called_aet: str,
        status: int,
        reason: str,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> None:
        self.status = status
        self.reason = reason
