"""The ``studies`` view: study, series and instance index with what C-FIND and QIDO-RS need.

Built from receipt events (the index attributes they carry) and blob purges (an instance whose
stored object retention deleted is no longer available). The latest stored version of a SOP
Instance UID wins; counts are recomputed for the studies and series a batch touched. A view
created by an older release (missing columns) is dropped and replayed from the log at start.
"""

from __future__ import annotations

import logging
from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord, View, drop_if_outdated
from projections.runner import index_text as _text
from projections.study_keys import series_key, study_key

STUDIES_SQL = """CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY, patient_id TEXT, issuer_of_patient_id TEXT,
    patient_name TEXT, patient_birth_date TEXT, patient_sex TEXT, study_date TEXT,
    study_time TEXT, accession_number TEXT, study_id TEXT, study_description TEXT,
    referring_physician_name TEXT, specific_character_set TEXT, modalities TEXT,
    timezone_offset_from_utc TEXT, number_of_series INTEGER NOT NULL DEFAULT 0,
    number_of_instances INTEGER NOT NULL DEFAULT 0, updated_at DOUBLE PRECISION NOT NULL,
    uid_derived INTEGER NOT NULL DEFAULT 0)"""

SERIES_SQL = """CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL, modality TEXT,
    series_number INTEGER, series_description TEXT, body_part_examined TEXT,
    series_date TEXT, series_time TEXT, performed_procedure_step_start_date TEXT,
    performed_procedure_step_start_time TEXT,
    number_of_instances INTEGER NOT NULL DEFAULT 0, updated_at DOUBLE PRECISION NOT NULL)"""

INSTANCES_SQL = """CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, instance_number INTEGER,
    rows_ INTEGER, columns_ INTEGER, number_of_frames INTEGER, bits_allocated INTEGER,
    acquisition_date_time TEXT, transfer_syntax_uid TEXT,
    sha256 TEXT NOT NULL, size BIGINT NOT NULL, job_id TEXT NOT NULL,
    available INTEGER NOT NULL DEFAULT 1, received_at DOUBLE PRECISION NOT NULL)"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id)",
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date)",
    "CREATE INDEX IF NOT EXISTS series_study ON series (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid)",
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid)",
)

PURGED = "Job.BlobPurged"

logger = logging.getLogger(__name__)

# (column, index keyword) of each table: text columns, then whole numbers.
STUDY_FIELDS = (
    ("patient_id", "PatientID"), ("issuer_of_patient_id", "IssuerOfPatientID"),
    ("patient_name", "PatientName"), ("patient_birth_date", "PatientBirthDate"),
    ("patient_sex", "PatientSex"), ("study_date", "StudyDate"), ("study_time", "StudyTime"),
    ("accession_number", "AccessionNumber"), ("study_id", "StudyID"),
    ("study_description", "StudyDescription"),
    ("referring_physician_name", "ReferringPhysicianName"),
    ("specific_character_set", "SpecificCharacterSet"),
    ("timezone_offset_from_utc", "TimezoneOffsetFromUTC"),
)
SERIES_FIELDS = (
    ("modality", "Modality"), ("series_description", "SeriesDescription"),
    ("body_part_examined", "BodyPartExamined"), ("series_date", "SeriesDate"),
    ("series_time", "SeriesTime"),
    ("performed_procedure_step_start_date", "PerformedProcedureStepStartDate"),
    ("performed_procedure_step_start_time", "PerformedProcedureStepStartTime"),
)
SERIES_NUMBERS = (("series_number", "SeriesNumber"),)
INSTANCE_NUMBERS = (
    ("instance_number", "InstanceNumber"), ("rows_", "Rows"), ("columns_", "Columns"),
    ("number_of_frames", "NumberOfFrames"), ("bits_allocated", "BitsAllocated"),
)
INSTANCE_TEXTS = (("acquisition_date_time", "AcquisitionDateTime"),)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _upsert(table: str, key: str, columns: list[str]) -> str:
    """An INSERT ... ON CONFLICT DO UPDATE of every column (both engines understand it)."""
    names = [key, *columns]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns)
    return (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            f" ON CONFLICT ({key}) DO UPDATE SET {updates}")


class StudiesView(View):
    name = "studies"
    follows = ("ingest",)
    tables = ("studies", "series", "instances")

    def __init__(self) -> None:
        self._touched_studies: set[str] = set()
        self._touched_series: set[str] = set()

    def create(self, cur: Cursor, dialect: str) -> None:
        drop_if_outdated(self, cur, dialect, {"studies": STUDIES_SQL, "series": SERIES_SQL,
                                              "instances": INSTANCES_SQL})
        for sql in (STUDIES_SQL, SERIES_SQL, INSTANCES_SQL, *INDEXES):
            cur.execute(sql)

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        if record.topic == "Job.Received":
            self._received(cur, record)
        elif record.topic == PURGED:
            # Retention deleted the stored object of this receipt (the row names its job).
            cur.execute("UPDATE instances SET available = 0 WHERE job_id = ?",
                        (record.originator_id,))

    def _received(self, cur: Cursor, r: EventRecord) -> None:
        idx = r.event.index
        # Without a Study Instance UID the instance gets a study of its own (study_keys.py).
        study, derived = study_key(idx, r.event.sop_instance_uid)
        series = series_key(idx, r.event.sop_instance_uid)
        cur.execute(_upsert("studies", "study_instance_uid",
                            [c for c, _ in STUDY_FIELDS] + ["updated_at", "uid_derived"]),
                    (study, *(_text(idx.get(k)) for _, k in STUDY_FIELDS), r.timestamp,
                     int(derived)))
        cur.execute(_upsert("series", "series_instance_uid",
                            ["study_instance_uid", "series_number",
                             *(c for c, _ in SERIES_FIELDS), "updated_at"]),
                    (series, study, _int(idx.get("SeriesNumber")),
                     *(_text(idx.get(k)) for _, k in SERIES_FIELDS), r.timestamp))
        self._instance(cur, r, study, series)
        self._touched_studies.add(study)
        self._touched_series.add(series)

    def _instance(self, cur: Cursor, r: EventRecord, study: str, series: str) -> None:
        e, idx = r.event, r.event.index
        columns = ["series_instance_uid", "study_instance_uid", "sop_class_uid",
                   *(c for c, _ in INSTANCE_NUMBERS), *(c for c, _ in INSTANCE_TEXTS),
                   "transfer_syntax_uid", "sha256", "size", "job_id", "available",
                   "received_at"]
        cur.execute(_upsert("instances", "sop_instance_uid", columns),
                    (e.sop_instance_uid, series, study, e.sop_class_uid,
                     *(_int(idx.get(k)) for _, k in INSTANCE_NUMBERS),
                     *(_text(idx.get(k)) for _, k in INSTANCE_TEXTS),
                     e.transfer_syntax_uid, e.sha256, e.size, r.originator_id, 1, r.timestamp))

    def end_batch(self, cur: Cursor) -> None:
        for series in sorted(self._touched_series):
            cur.execute(
                "UPDATE series SET number_of_instances = (SELECT count(*) FROM instances"
                " WHERE instances.series_instance_uid = ?) WHERE series_instance_uid = ?",
                (series, series),
            )
        for study in sorted(self._touched_studies):
            cur.execute(
                "SELECT DISTINCT modality FROM series WHERE study_instance_uid = ?"
                " AND modality IS NOT NULL ORDER BY modality", (study,),
            )
            modalities = "\\".join(row["modality"] for row in cur.fetchall())
            cur.execute(
                "UPDATE studies SET modalities = ?,"
                " number_of_series = (SELECT count(*) FROM series WHERE study_instance_uid = ?),"
                " number_of_instances = (SELECT count(*) FROM instances"
                " WHERE study_instance_uid = ?) WHERE study_instance_uid = ?",
                (modalities, study, study, study),
            )
        self._touched_studies.clear()
        self._touched_series.clear()
