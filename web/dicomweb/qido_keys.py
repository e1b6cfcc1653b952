"""The attributes QIDO-RS knows per level: their tag, VR, the studies-view column they come
from, and whether they are returned by default (PS3.18 table 10.6.3-3 and a few that viewers
expect, such as Study Description). Lookup by keyword or by eight hex digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag, tag_for_keyword

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)
PARENTS = {STUDY: (), SERIES: (STUDY,), INSTANCE: (STUDY, SERIES)}
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


@dataclass(frozen=True)
class Key:
    """One attribute a QIDO search can match on or return."""

    keyword: str
    tag: str  # eight upper-case hex digits, as DICOM JSON names it
    vr: str
    level: str
    column: str  # SQL expression over st / se / i
    default: bool = True  # returned without includefield
    matchable: bool = True


def _keys(level: str, alias: str, rows: tuple[tuple[str, str, str, str, bool], ...]
          ) -> tuple[Key, ...]:
    return tuple(Key(kw, tag, vr, level, f"{alias}.{col}", default)
                 for kw, tag, vr, col, default in rows)


_STUDY = _keys(STUDY, "st", (
    ("SpecificCharacterSet", "00080005", "CS", "specific_character_set", True),
    ("StudyDate", "00080020", "DA", "study_date", True),
    ("StudyTime", "00080030", "TM", "study_time", True),
    ("AccessionNumber", "00080050", "SH", "accession_number", True),
    ("ModalitiesInStudy", "00080061", "CS", "modalities", True),
    ("ReferringPhysicianName", "00080090", "PN", "referring_physician_name", True),
    ("TimezoneOffsetFromUTC", "00080201", "SH", "timezone_offset_from_utc", True),
    ("StudyDescription", "00081030", "LO", "study_description", True),
    ("PatientName", "00100010", "PN", "patient_name", True),
    ("PatientID", "00100020", "LO", "patient_id", True),
    ("IssuerOfPatientID", "00100021", "LO", "issuer_of_patient_id", False),
    ("PatientBirthDate", "00100030", "DA", "patient_birth_date", True),
    ("PatientSex", "00100040", "CS", "patient_sex", True),
    ("StudyInstanceUID", "0020000D", "UI", "study_instance_uid", True),
    ("StudyID", "00200010", "SH", "study_id", True),
))
_SERIES = _keys(SERIES, "se", (
    ("SeriesDate", "00080021", "DA", "series_date", False),
    ("SeriesTime", "00080031", "TM", "series_time", False),
    ("Modality", "00080060", "CS", "modality", True),
    ("SeriesDescription", "0008103E", "LO", "series_description", True),
    ("BodyPartExamined", "00180015", "CS", "body_part_examined", False),
    ("SeriesInstanceUID", "0020000E", "UI", "series_instance_uid", True),
    ("SeriesNumber", "00200011", "IS", "series_number", True),
    ("PerformedProcedureStepStartDate", "00400244", "DA",
     "performed_procedure_step_start_date", True),
    ("PerformedProcedureStepStartTime", "00400245", "TM",
     "performed_procedure_step_start_time", True),
))
_INSTANCE = _keys(INSTANCE, "i", (
    ("SOPClassUID", "00080016", "UI", "sop_class_uid", True),
    ("SOPInstanceUID", "00080018", "UI", "sop_instance_uid", True),
    ("AcquisitionDateTime", "0008002A", "DT", "acquisition_date_time", False),
    ("AvailableTransferSyntaxUID", "00083002", "UI", "transfer_syntax_uid", False),
    ("InstanceNumber", "00200013", "IS", "instance_number", True),
    ("NumberOfFrames", "00280008", "IS", "number_of_frames", True),
    ("Rows", "00280010", "US", "rows_", True),
    ("Columns", "00280011", "US", "columns_", True),
    ("BitsAllocated", "00280100", "US", "bits_allocated", True),
))
# Counts are return keys only (PS3.18: they cannot be matched on).
_COUNTS = (
    Key("NumberOfStudyRelatedSeries", "00201206", "IS", STUDY, "st.number_of_series",
        matchable=False),
    Key("NumberOfStudyRelatedInstances", "00201208", "IS", STUDY, "st.number_of_instances",
        matchable=False),
    Key("NumberOfSeriesRelatedInstances", "00201209", "IS", SERIES, "se.number_of_instances",
        matchable=False),
)
KEYS: tuple[Key, ...] = (*_STUDY, *_SERIES, *_INSTANCE, *_COUNTS)
BY_KEYWORD = {k.keyword: k for k in KEYS}
BY_TAG = {k.tag: k for k in KEYS}

# Computed per result at the level searched: Instance Availability and Retrieve URL.
AVAILABILITY = ("InstanceAvailability", "00080056", "CS")
RETRIEVE_URL = ("RetrieveURL", "00081190", "UR")
COMPUTED = {AVAILABILITY[0]: AVAILABILITY, RETRIEVE_URL[0]: RETRIEVE_URL,
            AVAILABILITY[1]: AVAILABILITY, RETRIEVE_URL[1]: RETRIEVE_URL}
# Returned at every level when known (they describe how to read the other values).
ALWAYS = ("SpecificCharacterSet", "TimezoneOffsetFromUTC")


class UnknownAttribute(ValueError):
    """Not a DICOM attribute keyword or tag at all."""


def find_key(name: str) -> Key | None:
    """The key a query parameter names (keyword or hex tag); None for a DICOM attribute this
    server does not index; :class:`UnknownAttribute` for anything else.
    """
    if name in BY_KEYWORD:
        return BY_KEYWORD[name]
    if _HEX_TAG.match(name):
        return BY_TAG.get(name.upper())
    if name in COMPUTED or tag_for_keyword(name) is not None:
        return None
    raise UnknownAttribute(name)


def canonical_name(name: str) -> str:
    """The keyword of a keyword or hex tag (for messages), else the name as given."""
    if _HEX_TAG.match(name):
        return keyword_for_tag(int(name, 16)) or name.upper()
    return name


def levels_for(level: str, scoped: tuple[str, ...]) -> tuple[str, ...]:
    """Levels whose attributes a search at ``level`` returns: its own and every parent level
    the URL does not already fix (PS3.18: /series returns the study attributes too).
    """
    return (*(p for p in PARENTS[level] if p not in scoped), level)


def searchable(level: str) -> tuple[str, ...]:
    """Levels whose attributes a search at ``level`` may match on."""
    return (*PARENTS[level], level)
