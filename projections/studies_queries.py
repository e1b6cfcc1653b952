"""Reads of studies for the studies pages and API: search with DICOM-style wildcards, one study
with its series and instances (studies view), and where its instances were delivered (jobs view).

Views only; ``?`` placeholders work on both backends. The studies and jobs views are separate
files on SQLite, so their rows are combined here, not joined in SQL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from projections.db import ViewDatabase
from projections.sql import like_pattern, page, where_clause
from router.domain.delivery_states import DELIVERY_STATES, shown

FILTER_FIELDS = ("patient_name", "patient_id", "study_date_from", "study_date_to", "modality",
                 "accession_number", "description", "study_uid")
STUDY_COLUMNS = (
    "study_instance_uid, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
    " patient_sex, study_date, study_time, accession_number, study_id, study_description,"
    " referring_physician_name, modalities, number_of_series, number_of_instances, updated_at,"
    " uid_derived"
)
SERIES_COLUMNS = (
    "series_instance_uid, modality, series_number, series_description, body_part_examined,"
    " series_date, series_time, number_of_instances"
)
INSTANCE_COLUMNS = (
    "sop_instance_uid, series_instance_uid, sop_class_uid, instance_number, rows_, columns_,"
    " number_of_frames, transfer_syntax_uid, size, job_id, received_at"
)
MAX_INSTANCES = 5000  # per study detail; a larger study says it was cut short
LIKE = "UPPER(st.{column}) LIKE UPPER(?) ESCAPE '\\'"
# The order a delivery status is reported in, most urgent first (shown names).
DELIVERY_STATUSES = DELIVERY_STATES


@dataclass(frozen=True)
class StudyFilters:
    """What a study search is narrowed to; None means "any"."""

    patient_name: str | None = None  # wildcards; without them, a prefix
    patient_id: str | None = None  # wildcards; without them, exact
    study_date_from: str | None = None  # YYYYMMDD, inclusive
    study_date_to: str | None = None  # YYYYMMDD, inclusive
    modality: str | None = None
    accession_number: str | None = None  # wildcards; without them, exact
    description: str | None = None  # wildcards; without them, anywhere in the text
    study_uid: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value, anchor in (
            ("patient_name", self.patient_name, "prefix"),
            ("patient_id", self.patient_id, "exact"),
            ("accession_number", self.accession_number, "exact"),
            ("study_description", self.description, "contains"),
        ):
            if value is not None:
                clauses.append(LIKE.format(column=column))
                params.append(like_pattern(value, anchor))
        if self.study_date_from is not None:
            clauses.append("st.study_date >= ?")
            params.append(self.study_date_from)
        if self.study_date_to is not None:
            clauses.append("st.study_date <= ?")
            params.append(self.study_date_to)
        if self.modality is not None:
            clauses.append("EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid"
                           " = st.study_instance_uid AND s.modality = ?)")
            params.append(self.modality)
        if self.study_uid is not None:
            clauses.append("st.study_instance_uid = ?")
            params.append(self.study_uid)
        return where_clause(clauses), params

    def used(self) -> list[str]:
        """Names of the filters in use (PHI-free, for the access record)."""
        return [name for name in FILTER_FIELDS if getattr(self, name) is not None]

    @property
    def empty(self) -> bool:
        return not self.used()


def search_studies(db: ViewDatabase, filters: StudyFilters, limit: int, offset: int
                   ) -> tuple[list[dict[str, Any]], int]:
    """One page of matching studies, most recent study date first; and the total."""
    return page(db, STUDY_COLUMNS, "studies st", filters.where(),
                "st.study_date DESC, st.study_time DESC, st.updated_at DESC,"
                " st.study_instance_uid", limit, offset)


def get_study(db: ViewDatabase, study_uid: str) -> dict[str, Any] | None:
    """The study with its series and (up to MAX_INSTANCES) instances; None if unknown."""
    rows = db.query(f"SELECT {STUDY_COLUMNS} FROM studies WHERE study_instance_uid = ?",
                    (study_uid,))
    if not rows:
        return None
    study = rows[0]
    study["series"] = db.query(
        f"SELECT {SERIES_COLUMNS} FROM series WHERE study_instance_uid = ?"
        " ORDER BY series_number, series_instance_uid", (study_uid,))
    instances = db.query(
        f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_instance_uid = ?"
        " ORDER BY series_instance_uid, instance_number, sop_instance_uid LIMIT ?",
        (study_uid, MAX_INSTANCES + 1))
    study["instances_truncated"] = len(instances) > MAX_INSTANCES
    study["instances"] = instances[:MAX_INSTANCES]
    return study


def delivery_status(jobs_db: ViewDatabase, study_uid: str
                    ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, str]]]:
    """Where the study's instances went: per destination the number of instances in each
    delivery status, and per SOP Instance UID each destination's status.

    An instance received again (a new version) reports the delivery of its latest version;
    a duplicate that was not delivered again leaves the original's delivery in place.
    """
    rows = jobs_db.query(
        "SELECT j.sop_instance_uid, d.destination, d.status FROM jobs j"
        " JOIN deliveries d ON d.job_id = j.job_id WHERE j.study_instance_uid = ?"
        " ORDER BY j.received_at, j.job_id", (study_uid,))
    per_instance: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        per_instance[row["sop_instance_uid"]][row["destination"]] = shown(row["status"])
    summary: dict[str, dict[str, int]] = {}
    for statuses in per_instance.values():
        for destination, status in statuses.items():
            counts = summary.setdefault(destination, dict.fromkeys(DELIVERY_STATUSES, 0))
            counts[status] = counts.get(status, 0) + 1
    return dict(sorted(summary.items())), dict(per_instance)
