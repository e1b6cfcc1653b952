"""The patient access report: who read one patient's data in a period, one row per access,
from the audit view. The many DICOMweb reads of one viewer session (metadata, frames,
thumbnails of one user and study close together in time) are folded into one row with a
count; receipts, deliveries and other machine events are not accesses and are left out.

Also the patient picker (matching patients from the studies view) and the CSV encoding.
No aiohttp here.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from projections.audit_queries import csv_cell, iso
from projections.sql import like_literal, search_name
from router.domain.users import user_id

Row = dict[str, Any]

# Reads of one user and study at most this far apart belong to one session.
SESSION_GAP = 15 * 60.0
MAX_ROWS = 100_000  # audit rows read for one report; beyond this the report says it is cut
MAX_PATIENTS = 50

# What each access action is, in words; actions not listed show as themselves.
KINDS = {
    "study.view": "Study page",
    "instance.view": "Instance page (tags)",
    "study.export": "Download (ZIP)",
    "transform.preview": "Transforms dry run",
    "reidentification.lookup": "Re-identification",
    "transfer.view": "Transfer (jobs page)",
    "job.view": "Job page",
    "viewer.open": "Viewer session",
    "dicomweb.retrieve": "DICOMweb retrieval",
    "wado.retrieve": "DICOMweb retrieval",
    "dicomweb.metadata": "DICOMweb retrieval",
    "dicomweb.frames": "DICOMweb retrieval",
    "dicomweb.bulkdata": "DICOMweb retrieval",
    "dicomweb.rendered": "DICOMweb retrieval",
    "dicomweb.thumbnail": "DICOMweb retrieval",
    "dimse.move": "Export (DICOM C-MOVE)",
    "dimse.get": "Export (DICOM C-GET)",
    "audit.export": "Audit trail export",
    "audit.access_report_export": "Access report export",
    "dicomweb.search": "Query (QIDO-RS)",
    "studies.search": "Query (study list)",
    "jobs.list": "Query (job list)",
    "dimse.find": "Query (DICOM C-FIND)",
    "remote.find": "Query of a remote PACS",
    "remote.move": "Retrieve from a remote PACS",
    "remote.get": "Retrieve from a remote PACS",
    "remote.retrieve.view": "Remote retrieve page",
    "study.store": "Upload (STOW-RS)",
    "audit.search": "Audit trail search",
    "audit.history": "Audit trail: study history",
    "audit.access_report": "Access report",
}
# Retrievals folded with their repeats (one client fetching a study instance by instance).
RETRIEVALS = frozenset({"dicomweb.retrieve", "wado.retrieve", "dicomweb.metadata",
                        "dicomweb.frames", "dicomweb.bulkdata", "dicomweb.rendered",
                        "dicomweb.thumbnail"})
# Reads a viewer makes: folded into the viewer session they follow.
VIEWER_READS = RETRIEVALS - {"dicomweb.retrieve", "wado.retrieve"} | {"dicomweb.search"}
# Access records made by machines, not people.
MACHINE_ACTIONS = frozenset({"ai.callback"})

_SELECT = ("SELECT occurred_at, actor, source_ip, action, object_type, object_id, outcome,"
           " study_instance_uid, detail, position FROM audit"
           " WHERE patient_id = ? AND occurred_at >= ? AND occurred_at <= ?"
           " AND application = 'access' ORDER BY occurred_at, position LIMIT ?")
CSV_COLUMNS = ("first_time", "last_time", "user", "role", "client_ip", "what", "actions",
               "count", "study_instance_uid", "outcome")


@dataclass
class Access:
    """One access, or one folded session of reads."""

    first: float
    last: float
    actor: str
    source_ip: str
    kind: str
    study_uid: str
    actions: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    role: str = ""
    other_ips: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return sum(self.actions.values())

    @property
    def outcome(self) -> str:
        if not self.failures:
            return "success"
        return "failure" if self.failures == self.count else "partial"

    def actions_text(self) -> str:
        """``viewer.open, dicomweb.frames x60, dicomweb.metadata x2``."""
        return ", ".join(action if n == 1 else f"{action} x{n}"
                         for action, n in self.actions.most_common())

    def add(self, row: Row) -> None:
        self.actions[row["action"]] += 1
        self.last = float(row["occurred_at"])
        if row["outcome"] != "success":
            self.failures += 1
        if row["source_ip"] and row["source_ip"] != self.source_ip:
            self.other_ips.add(str(row["source_ip"]))


@dataclass(frozen=True)
class Report:
    patient_id: str
    since: float
    until: float
    accesses: list[Access]
    rows_read: int
    cut: bool  # more than MAX_ROWS rows: the report ends early


def kind_of(action: str) -> str:
    return KINDS.get(action, action)


def fold(rows: Iterable[Row], gap: float = SESSION_GAP) -> list[Access]:
    """Audit rows (oldest first) as accesses: a viewer open and the reads of that user and
    study that follow it within ``gap`` of each other are one row, and so are repeated
    DICOMweb retrievals of one user and study; every other access is a row of its own."""
    accesses: list[Access] = []
    open_: dict[tuple[str, str, str], Access] = {}
    for row in rows:
        action = str(row["action"])
        if action in MACHINE_ACTIONS:
            continue
        at = float(row["occurred_at"])
        actor = str(row["actor"])
        study = str(row["study_instance_uid"] or "")
        if action in RETRIEVALS or action in VIEWER_READS:
            # A viewer's search that names no study (its list of the patient's other
            # studies) belongs to the user's latest viewer session of this patient.
            session = (_joinable(open_, actor, study, action, at, gap) if study else
                       _joinable(open_, actor, "", action, at, gap))
            if session is not None:
                session.add(row)
                continue
        access = Access(first=at, last=at, actor=actor, source_ip=str(row["source_ip"] or ""),
                        kind=kind_of(action), study_uid=study)
        access.add(row)
        accesses.append(access)
        if study and (action == "viewer.open" or action in RETRIEVALS):
            family = "viewer" if action == "viewer.open" else "dicomweb"
            open_[(actor.lower(), study, family)] = access
            if family == "viewer":
                open_[(actor.lower(), "", family)] = access
    return accesses


def _joinable(open_: dict[tuple[str, str, str], Access], actor: str, study: str, action: str,
              at: float, gap: float) -> Access | None:
    """The open session this read belongs to: the user's viewer session of the study for a
    viewer's read, else their run of retrievals of it; None when too long ago."""
    families = [family for family, members in (("viewer", VIEWER_READS),
                                               ("dicomweb", RETRIEVALS)) if action in members]
    for family in families:
        session = open_.get((actor.lower(), study, family))
        if session is not None and at - session.last <= gap:
            return session
    return None


def report(db: Any, patient_id: str, since: float, until: float,
           max_rows: int = MAX_ROWS) -> Report:
    """Every access to ``patient_id``'s data between ``since`` and ``until``, folded."""
    rows = db.query(_SELECT, [patient_id, since, until, max_rows + 1])
    cut = len(rows) > max_rows
    rows = rows[:max_rows]
    accesses = fold(rows)
    roles = roles_at(db, {a.actor for a in accesses})
    for access in accesses:
        access.role = role_when(roles.get(access.actor.lower(), []), access.first)
    return Report(patient_id, since, until, accesses, len(rows), cut)


def roles_at(db: Any, actors: Iterable[str]) -> dict[str, list[tuple[float, str]]]:
    """Each user's roles over time (from their ``User.Created`` and ``User.RoleChanged``
    rows): lower-case name -> [(since, role), ...] oldest first. Actors that are not user
    accounts (DICOM AE titles, ``cli``) have none."""
    found: dict[str, list[tuple[float, str]]] = {}
    for actor in actors:
        rows = db.query("SELECT occurred_at, detail FROM audit WHERE object_id = ?"
                        " AND action IN ('User.Created', 'User.RoleChanged')"
                        " ORDER BY occurred_at", [str(user_id(actor))])
        changes = [(float(r["occurred_at"]), _role_of(r["detail"])) for r in rows]
        found[actor.lower()] = [(at, role) for at, role in changes if role]
    return found


def _role_of(detail: str | None) -> str:
    try:
        role = json.loads(detail or "{}").get("role")
    except (ValueError, AttributeError):
        return ""
    return str(role) if role else ""


def role_when(changes: Sequence[tuple[float, str]], at: float) -> str:
    """The role held at ``at``: the last change before it (else the first known)."""
    role = ""
    for since, value in changes:
        if since > at and role:
            break
        role = value
    return role


def matching_patients(studies_db: Any, term: str) -> list[Row]:
    """Patients whose ID starts with ``term`` or whose name contains it (case-insensitive),
    with their number of studies and latest study date; at most MAX_PATIENTS."""
    like = like_literal(term.lower())
    name = like_literal(search_name(term).lower())  # "DOE, JOHN" as the pages show it
    return list(studies_db.query(
        "SELECT patient_id, max(patient_name) AS patient_name, count(*) AS studies,"
        " max(study_date) AS last_study_date FROM studies"
        " WHERE patient_id IS NOT NULL AND (patient_id = ? OR lower(patient_id) LIKE ? ESCAPE '!'"
        " OR lower(patient_name) LIKE ? ESCAPE '!')"
        " GROUP BY patient_id ORDER BY patient_id LIMIT ?",
        [term, like + "%", "%" + name + "%", MAX_PATIENTS]))


def patient_name(studies_db: Any, patient_id: str) -> str:
    """The name the studies view has for ``patient_id`` (empty when none)."""
    rows = studies_db.query("SELECT max(patient_name) AS name FROM studies WHERE patient_id = ?",
                            [patient_id])
    return str(rows[0]["name"] or "") if rows else ""


def csv_text(rep: Report) -> str:
    """The report as CSV (RFC 4180, header first, cells neutralised against formulas)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for a in rep.accesses:
        ips = " ".join([a.source_ip, *sorted(a.other_ips)]).strip()
        writer.writerow([csv_cell(v) for v in (
            iso(a.first), iso(a.last), a.actor, a.role, ips, a.kind, a.actions_text(),
            a.count, a.study_uid, a.outcome)])
    return buffer.getvalue()
