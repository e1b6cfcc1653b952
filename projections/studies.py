"""The ``studies`` view: study, series and instance index with what C-FIND and QIDO-RS need.

Built from receipt events only (the index attributes they carry). The latest stored version of
a SOP Instance UID wins; counts are recomputed for the studies and series a batch touched.
"""

from __future__ import annotations

from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord, View
from projections.runner import index_text as _text

STUDIES_SQL = """CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY, patient_id TEXT, issuer_of_patient_id TEXT,
    patient_name TEXT, patient_birth_date TEXT, patient_sex TEXT, study_date TEXT,
    study_time TEXT, accession_number TEXT, study_id TEXT, study_description TEXT,
    referring_physician_name TEXT, specific_character_set TEXT, modalities TEXT,
    number_of_series INTEGER NOT NULL DEFAULT 0, number_of_instances INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL)"""

SERIES_SQL = """CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL, modality TEXT,
    series_number INTEGER, series_description TEXT, body_part_examined TEXT,
    series_date TEXT, series_time TEXT,
    number_of_instances INTEGER NOT NULL DEFAULT 0, updated_at DOUBLE PRECISION NOT NULL)"""

INSTANCES_SQL = """CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, instance_number INTEGER,
    rows_ INTEGER, columns_ INTEGER, number_of_frames INTEGER, transfer_syntax_uid TEXT,
    sha256 TEXT NOT NULL, size BIGINT NOT NULL, job_id TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL)"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id)",
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date)",
    "CREATE INDEX IF NOT EXISTS series_study ON series (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid)",
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid)",
)

UNKNOWN = "UNKNOWN"


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class StudiesView(View):
    name = "studies"
    follows = ("ingest",)
    tables = ("studies", "series", "instances")

    def __init__(self) -> None:
        self._touched_studies: set[str] = set()
        self._touched_series: set[str] = set()

    def create(self, cur: Cursor, dialect: str) -> None:
        for sql in (STUDIES_SQL, SERIES_SQL, INSTANCES_SQL, *INDEXES):
            cur.execute(sql)

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        if record.topic == "Job.Received":
            self._received(cur, record)

    def _received(self, cur: Cursor, r: EventRecord) -> None:
        e, idx = r.event, r.event.index
        study = str(idx.get("StudyInstanceUID") or UNKNOWN)
        series = str(idx.get("SeriesInstanceUID") or UNKNOWN)
        cur.execute(
            "INSERT INTO studies (study_instance_uid, patient_id, issuer_of_patient_id,"
            " patient_name, patient_birth_date, patient_sex, study_date, study_time,"
            " accession_number, study_id, study_description, referring_physician_name,"
            " specific_character_set, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (study_instance_uid) DO UPDATE SET patient_id = excluded.patient_id,"
            " issuer_of_patient_id = excluded.issuer_of_patient_id,"
            " patient_name = excluded.patient_name,"
            " patient_birth_date = excluded.patient_birth_date,"
            " patient_sex = excluded.patient_sex, study_date = excluded.study_date,"
            " study_time = excluded.study_time, accession_number = excluded.accession_number,"
            " study_id = excluded.study_id, study_description = excluded.study_description,"
            " referring_physician_name = excluded.referring_physician_name,"
            " specific_character_set = excluded.specific_character_set,"
            " updated_at = excluded.updated_at",
            (study, _text(idx.get("PatientID")), _text(idx.get("IssuerOfPatientID")),
             _text(idx.get("PatientName")), _text(idx.get("PatientBirthDate")),
             _text(idx.get("PatientSex")), _text(idx.get("StudyDate")),
             _text(idx.get("StudyTime")), _text(idx.get("AccessionNumber")),
             _text(idx.get("StudyID")), _text(idx.get("StudyDescription")),
             _text(idx.get("ReferringPhysicianName")), _text(idx.get("SpecificCharacterSet")),
             r.timestamp),
        )
        cur.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, modality,"
            " series_number, series_description, body_part_examined, series_date,"
            " series_time, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (series_instance_uid) DO UPDATE SET"
            " study_instance_uid = excluded.study_instance_uid, modality = excluded.modality,"
            " series_number = excluded.series_number,"
            " series_description = excluded.series_description,"
            " body_part_examined = excluded.body_part_examined,"
            " series_date = excluded.series_date, series_time = excluded.series_time,"
            " updated_at = excluded.updated_at",
            (series, study, _text(idx.get("Modality")), _int(idx.get("SeriesNumber")),
             _text(idx.get("SeriesDescription")), _text(idx.get("BodyPartExamined")),
             _text(idx.get("SeriesDate")), _text(idx.get("SeriesTime")), r.timestamp),
        )
        cur.execute(
            "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,"
            " sop_class_uid, instance_number, rows_, columns_, number_of_frames,"
            " transfer_syntax_uid, sha256, size, job_id, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sop_instance_uid) DO UPDATE SET"
            " series_instance_uid = excluded.series_instance_uid,"
            " study_instance_uid = excluded.study_instance_uid,"
            " sop_class_uid = excluded.sop_class_uid,"
            " instance_number = excluded.instance_number, rows_ = excluded.rows_,"
            " columns_ = excluded.columns_, number_of_frames = excluded.number_of_frames,"
            " transfer_syntax_uid = excluded.transfer_syntax_uid, sha256 = excluded.sha256,"
            " size = excluded.size, job_id = excluded.job_id,"
            " received_at = excluded.received_at",
            (e.sop_instance_uid, series, study, e.sop_class_uid,
             _int(idx.get("InstanceNumber")), _int(idx.get("Rows")), _int(idx.get("Columns")),
             _int(idx.get("NumberOfFrames")), e.transfer_syntax_uid, e.sha256, e.size,
             r.originator_id, r.timestamp),
        )
        self._touched_studies.add(study)
        self._touched_series.add(series)

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

