"""Reads of the studies view for DICOMweb: the instances a WADO-RS, WADO-URI or download URL
names (with the digest of their stored object), whether its study and series exist, and the
SQL of a QIDO-RS search at each level (matching by the engine of projections/matching.py).

UIDs are only ever SQL parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from projections import matching as engine
from projections.db import Row, ViewDatabase
from projections.sql import where_clause

STUDY, SERIES, INSTANCE = "study", "series", "instance"

INSTANCE_SQL = (
    "SELECT i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid, i.sop_class_uid,"
    " i.transfer_syntax_uid, i.sha256, i.size, i.number_of_frames, i.rows_, i.available,"
    " st.patient_id FROM instances i"
    " JOIN series se ON se.series_instance_uid = i.series_instance_uid"
    " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
)
INSTANCE_ORDER = (
    " ORDER BY (se.series_number IS NULL), se.series_number, i.series_instance_uid,"
    " (i.instance_number IS NULL), i.instance_number, i.sop_instance_uid"
)

# QIDO-RS: what a search at each level reads, in which order, and its UIDs.
FROM = {
    STUDY: "studies st",
    SERIES: "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    INSTANCE: "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
              " JOIN studies st ON st.study_instance_uid = i.study_instance_uid",
}
SCOPE_COLUMN = {
    (SERIES, STUDY): "se.study_instance_uid", (INSTANCE, STUDY): "i.study_instance_uid",
    (INSTANCE, SERIES): "i.series_instance_uid",
}
ORDER = {
    STUDY: "(st.study_date IS NULL), st.study_date DESC, (st.study_time IS NULL),"
           " st.study_time DESC, st.study_instance_uid",
    SERIES: "se.study_instance_uid, (se.series_number IS NULL), se.series_number,"
            " se.series_instance_uid",
    INSTANCE: "i.series_instance_uid, (i.instance_number IS NULL), i.instance_number,"
              " i.sop_instance_uid",
}
_ONLINE = "CASE WHEN {test} THEN 'ONLINE' ELSE 'UNAVAILABLE' END"
AVAILABLE_SQL = {
    STUDY: _ONLINE.format(test="EXISTS (SELECT 1 FROM instances a WHERE a.study_instance_uid"
                               " = st.study_instance_uid AND a.available = 1)"),
    SERIES: _ONLINE.format(test="EXISTS (SELECT 1 FROM instances a WHERE a.series_instance_uid"
                                " = se.series_instance_uid AND a.available = 1)"),
    INSTANCE: _ONLINE.format(test="i.available = 1"),
}
IDS = {STUDY: "st.study_instance_uid", SERIES: "se.series_instance_uid",
       INSTANCE: "i.sop_instance_uid"}


@dataclass(frozen=True)
class InstanceRow:
    """One stored instance as the studies view knows it."""

    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str
    sha256: str
    size: int
    frames: int
    has_pixels: bool  # the index has Rows: an image
    available: bool
    patient_id: str | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> InstanceRow:
        return cls(row["study_instance_uid"], row["series_instance_uid"],
                   row["sop_instance_uid"], row["sop_class_uid"], row["transfer_syntax_uid"],
                   row["sha256"], int(row["size"]), int(row["number_of_frames"] or 1),
                   row["rows_"] is not None, bool(row["available"]), row["patient_id"])


def query_instances(db: ViewDatabase, study: str, series: str | None = None,
                    sop: str | None = None) -> list[InstanceRow]:
    """The instances of a study, of one of its series or one instance, in series and instance
    number order."""
    where, params = " WHERE i.study_instance_uid = ?", [study]
    if series is not None:
        where += " AND i.series_instance_uid = ?"
        params.append(series)
    if sop is not None:
        where += " AND i.sop_instance_uid = ?"
        params.append(sop)
    return [InstanceRow.of(r) for r in db.query(INSTANCE_SQL + where + INSTANCE_ORDER, params)]


def find_study(db: ViewDatabase, study: str) -> Row | None:
    """The study's row (its ``patient_id``), None when the view does not have it."""
    rows = db.query("SELECT patient_id FROM studies WHERE study_instance_uid = ?", (study,))
    return rows[0] if rows else None


def has_series(db: ViewDatabase, study: str, series: str) -> bool:
    """Whether the view has ``series`` in ``study``."""
    return bool(db.query(
        "SELECT 1 FROM series WHERE series_instance_uid = ? AND study_instance_uid = ?",
        (series, study)))


def missing_level(db: ViewDatabase, study: str, series: str | None = None) -> str | None:
    """The first of ``study`` and ``series`` (a series of that study) the view does not have:
    STUDY, SERIES, or None when both exist."""
    if find_study(db, study) is None:
        return STUDY
    if series is not None and not has_series(db, study, series):
        return SERIES
    return None


def search(db: ViewDatabase, level: str, returned: Mapping[str, str], id_levels: Sequence[str],
           conditions: Sequence[engine.Condition], scope: Mapping[str, str], limit: int,
           offset: int) -> list[Row]:
    """Up to ``limit`` results of a QIDO-RS search at ``level`` after the first ``offset``:
    each ``returned`` column (name -> SQL expression over st / se / i) as ``k_<name>``, the UID
    of each of ``id_levels`` as ``id_<level>``, and ``availability``; matching ``conditions``
    within ``scope`` (level -> UID of the study or series the URL names)."""
    columns = [f"{column} AS k_{name}" for name, column in returned.items()]
    columns += [f"{IDS[id_level]} AS id_{id_level}" for id_level in id_levels]
    columns.append(f"{AVAILABLE_SQL[level]} AS availability")
    found = engine.where(conditions, db.dialect)
    columns += found.columns()
    clauses, params = list(found.clauses), list(found.params)
    for parent, uid in scope.items():
        clauses.append(f"{SCOPE_COLUMN[(level, parent)]} = ?")
        params.append(uid)
    sql = (f"SELECT {', '.join(columns)} FROM {FROM[level]}{where_clause(clauses)}"
           f" ORDER BY {ORDER[level]}")
    return engine.fetch(db, sql, params, found, limit, offset)
