"""The attributes QIDO-RS knows per level: their tag, VR, the studies-view column they come
from (the matching engine's, projections/matching.py), and whether they are returned by
default (PS3.18 table 10.6.3-3 and a few that viewers expect, such as Study Description).
Lookup by keyword or by eight hex digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from projections.matching import ATTRIBUTES

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


def _keys(level: str, rows: tuple[tuple[str, str, bool], ...]) -> tuple[Key, ...]:
    return tuple(Key(kw, tag, ATTRIBUTES[kw].vr, level, ATTRIBUTES[kw].column, default)
                 for kw, tag, default in rows)


_STUDY = _keys(STUDY, (
    ("SpecificCharacterSet", "00080005", True),
    ("StudyDate", "00080020", True),
    ("StudyTime", "00080030", True),
    ("AccessionNumber", "00080050", True),
    ("ModalitiesInStudy", "00080061", True),
    ("ReferringPhysicianName", "00080090", True),
    ("TimezoneOffsetFromUTC", "00080201", True),
    ("StudyDescription", "00081030", True),
    ("PatientName", "00100010", True),
    ("PatientID", "00100020", True),
    ("IssuerOfPatientID", "00100021", False),
    ("PatientBirthDate", "00100030", True),
    ("PatientSex", "00100040", True),
    ("StudyInstanceUID", "0020000D", True),
    ("StudyID", "00200010", True),
))
_SERIES = _keys(SERIES, (
    ("SeriesDate", "00080021", False),
    ("SeriesTime", "00080031", False),
    ("Modality", "00080060", True),
    ("SeriesDescription", "0008103E", True),
    ("BodyPartExamined", "00180015", False),
    ("SeriesInstanceUID", "0020000E", True),
    ("SeriesNumber", "00200011", True),
    ("PerformedProcedureStepStartDate", "00400244", True),
    ("PerformedProcedureStepStartTime", "00400245", True),
))
_INSTANCE = _keys(INSTANCE, (
    ("SOPClassUID", "00080016", True),
    ("SOPInstanceUID", "00080018", True),
    ("AcquisitionDateTime", "0008002A", False),
    ("AvailableTransferSyntaxUID", "00083002", False),
    ("InstanceNumber", "00200013", True),
    ("NumberOfFrames", "00280008", True),
    ("Rows", "00280010", True),
    ("Columns", "00280011", True),
    ("BitsAllocated", "00280100", True),
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
