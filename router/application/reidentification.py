"""The re-identification map of de-identification projects: recording what each pseudonym
stands for as copies are sent, and looking one up (an audited access).

Seeds: a project's seed is derived from the master key (HKDF, purpose ``deid-project/NAME``),
so every node sharing the key gives a patient the same pseudonym, across studies and restarts,
and no seed is stored anywhere. Originals are sealed with the SecretBox, bound to the project,
kind and pseudonym, so a sealed value copied to another entry does not open.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.commands import CommandError, NotFoundError
from router.application.sessions import AccessRecord
from router.domain.reidentification import KINDS, Pseudonym, pseudonym_id
from router.secrets import SecretBox
from router.transforms.deid import Identity

_REMEMBERED = 100_000  # pseudonyms known to be recorded, per process (then forgotten)


def project_seed(box: SecretBox, project: str) -> str:
    """The secret dicognito seed of ``project`` (same on every node sharing the master key)."""
    return box.derive(f"deid-project/{project}").hex()


def _context(project: str, kind: str, pseudonym: str) -> str:
    return f"reid/{project}/{kind}/{pseudonym}"


class ReidentificationMap:
    """Records pseudonyms as they are sent and opens them for those allowed to look."""

    def __init__(self, app: Any, box: SecretBox) -> None:
        self._app = app  # the delivery application
        self._box = box
        self._known: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def seed(self, project: str) -> str:
        return project_seed(self._box, project)

    def record(self, project: str, identity: Identity, correlation_id: str = "") -> int:
        """Save the entries of ``identity`` not yet known; returns how many were new."""
        originals = {"patient_id": identity.patient_id, "patient_name": identity.patient_name,
                     "study_instance_uid": identity.study_uid,
                     "pseudo_patient_id": identity.pseudo_patient_id,
                     "pseudo_patient_name": identity.pseudo_patient_name,
                     "pseudo_study_instance_uid": identity.pseudo_study_uid}
        new = 0
        for kind, pseudonym in (("patient", identity.pseudo_patient_id),
                                ("study", identity.pseudo_study_uid)):
            key = (project, kind, pseudonym)
            with self._lock:
                if not pseudonym or key in self._known:
                    continue
            sealed = self._box.seal(json.dumps(originals, sort_keys=True),
                                    context=_context(*key))
            try:
                self._app.save(Pseudonym(project, kind, pseudonym, actor="system",
                                         source_ip="", correlation_id=correlation_id,
                                         sealed=sealed))
                new += 1
            except IntegrityError:
                pass  # recorded before (by us after a restart, or by another node)
            with self._lock:
                if len(self._known) > _REMEMBERED:
                    self._known.clear()
                self._known.add(key)
        return new

    def lookup(self, project: str, kind: str, pseudonym: str) -> dict[str, str]:
        """The originals behind ``pseudonym``; :class:`NotFoundError` if never sent."""
        if kind not in KINDS:
            raise CommandError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if not project or not pseudonym:
            raise CommandError("project and pseudonym are required")
        try:
            entry = self._app.repository.get(pseudonym_id(project, kind, pseudonym))
        except AggregateNotFoundError:
            raise NotFoundError(f"no {kind} pseudonym {pseudonym!r} in project {project!r}"
                                ) from None
        if not isinstance(entry, Pseudonym):
            raise NotFoundError(f"no {kind} pseudonym {pseudonym!r} in project {project!r}")
        opened: dict[str, str] = json.loads(
            self._box.open(entry.sealed, context=_context(project, kind, pseudonym)))
        return opened


def lookup_record(project: str, kind: str, pseudonym: str, found: dict[str, str] | None,
                  reason: str) -> AccessRecord:
    """The access record of one re-identification lookup (found or not), with its reason."""
    return AccessRecord(
        action="reidentification.lookup", object_type="pseudonym",
        object_id=f"{project}/{kind}/{pseudonym}",
        outcome="success" if found is not None else "not_found",
        study_instance_uid=(found or {}).get("study_instance_uid"),
        patient_id=(found or {}).get("patient_id"),
        detail=f"project {project}; reason: {reason}"[:1000])
