"""Aggregates of the re-identification map: one per pseudonym a de-identification project has
sent out (a patient's pseudonymous PatientID, or a study's pseudonymous Study Instance UID),
holding the original identifiers sealed (AES-256-GCM) so the log never shows them in clear.

Kept in the delivery log, next to the deliveries that sent the pseudonyms. Event names and
this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_OID, UUID, uuid5

from eventsourcing.domain import Aggregate, event

REID_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/reidentification")
KINDS = ("patient", "study")


def pseudonym_id(project: str, kind: str, pseudonym: str) -> UUID:
    """The stable id of one pseudonym of one project."""
    return uuid5(REID_NAMESPACE, f"{project}/{kind}/{pseudonym}")


class Pseudonym(Aggregate):
    """A pseudonym and the sealed originals it stands for (``sealed``: JSON, see
    router.application.reidentification)."""

    @staticmethod
    def create_id(project: str, kind: str, pseudonym: str, **_: Any) -> UUID:
        return pseudonym_id(project, kind, pseudonym)

    @event("Recorded")
    def __init__(
        self,
        project: str,
        kind: str,
        pseudonym: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        sealed: str,
    ) -> None:
        self.project = project
        self.kind = kind
        self.pseudonym = pseudonym
        self.sealed = sealed
