"""The studies view as C-FIND reads it (router/dicom/qr_matching.py): which tables a query at
each Query/Retrieve level reads and in which order its matches come. The identifier's keys,
their columns and the conditions (projections/matching.py) are the caller's."""

from __future__ import annotations

from collections.abc import Sequence

from projections.matching import Where

FROM = {
    "PATIENT": "studies st", "STUDY": "studies st",
    "SERIES": "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    "IMAGE": "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
             " JOIN studies st ON st.study_instance_uid = i.study_instance_uid",
}
ORDER = {"PATIENT": "k_patientid", "STUDY": "k_studydate, k_studytime, k_studyinstanceuid",
         "SERIES": "k_seriesnumber, k_seriesinstanceuid",
         "IMAGE": "k_seriesinstanceuid, k_instancenumber, k_sopinstanceuid"}


def select_text(level: str, columns: Sequence[str], found: Where) -> str:
    """SELECT ``columns`` at ``level`` where ``found``'s SQL clauses hold, in order, without
    LIMIT. At PATIENT level the studies are grouped by patient (aggregate the columns)."""
    text = f"SELECT {', '.join(columns)} FROM {FROM[level]}"
    if found.clauses:
        text += " WHERE " + " AND ".join(found.clauses)
    if level == "PATIENT":
        text += " GROUP BY st.patient_id"
    text += f" ORDER BY {ORDER[level]}"
    return text
