"""One table of matching cases (PS3.4 C.2.2.2) for C-FIND and QIDO-RS: the instances stored,
and for each query the level, the keys and the labels that must match. The same table runs
through a DICOM SCU and through HTTP against one router (tests/integration/
test_matching_table.py), so the two interfaces cannot drift apart.

Labels: studies ``S1``..``S5``, series ``S1a``.., instances ``S1a1``... A key's value is the
text both interfaces send: several values are separated by a backslash (a DICOM multi-value
for C-FIND, the same text in the query string for QIDO). ``{S1}`` stands for S1's Study
Instance UID (and ``{S1a}``, ``{S1a1}`` for series and instances).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import CTImageStorage, MRImageStorage

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage, "US": US_IMAGE, "CR": CR_IMAGE}


@dataclass(frozen=True)
class StoredSeries:
    label: str
    modality: str
    number: int
    instances: tuple[dict[str, Any], ...] = ({},)  # per instance: extra attributes
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredStudy:
    label: str
    charset: str
    attrs: dict[str, Any]
    series: tuple[StoredSeries, ...]


STUDIES = (
    StoredStudy("S1", "ISO_IR 192", {
        "PatientName": "Doe^Jane", "PatientID": "PID-1", "StudyDate": "20240115",
        "StudyTime": "093000", "AccessionNumber": "ACC_1%", "StudyDescription": "CT chest",
    }, (
        StoredSeries("S1a", "CT", 1, ({"InstanceNumber": 1,
                                       "AcquisitionDateTime": "20240115093000"},
                                      {"InstanceNumber": 2,
                                       "AcquisitionDateTime": "20240115093100.5"}),
                     {"SeriesDescription": "axial 1mm", "BodyPartExamined": "CHEST"}),
        StoredSeries("S1b", "MR", 2, ({"InstanceNumber": 1},),
                     {"SeriesDate": "20240115", "SeriesTime": "0945"}),
    )),
    StoredStudy("S2", "ISO_IR 192", {
        "PatientName": "DOE^JOHN^^", "PatientID": "PID-2", "StudyDate": "20240120",
        "StudyTime": "1530", "AccessionNumber": "ACC11", "ReferringPhysicianName": "Who^Ever",
    }, (StoredSeries("S2a", "CT", 1, ({"InstanceNumber": 1},)),)),
    StoredStudy("S3", "ISO_IR 100", {
        "PatientName": "Müller^Hans", "PatientID": "PID-3", "StudyDate": "20231231",
        "StudyTime": "235959.5", "AccessionNumber": "acc_1%", "StudyDescription": "50% dose",
    }, (StoredSeries("S3a", "US", 7, ({"InstanceNumber": 1},)),)),
    StoredStudy("S4", "ISO_IR 192", {
        "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう", "PatientID": "PID-4",
        "StudyTime": "101500.25", "StudyDescription": "Knee",
    }, (StoredSeries("S4a", "CR", 1, ({"InstanceNumber": 1},)),)),
    StoredStudy("S5", "ISO_IR 192", {
        "PatientName": "Smith^Ann", "PatientID": "PID-5", "StudyDate": "20240115",
        "StudyTime": "0930", "AccessionNumber": "C1", "StudyDescription": "MR knee",
    }, (StoredSeries("S5a", "MR", 3, ({"InstanceNumber": 1},),
                     {"SeriesDescription": "sag T1"}),)),
)


@dataclass(frozen=True)
class Case:
    """Keys asked at ``level`` (study, series, instance) and the labels that must match; or,
    with ``refused``, a query both interfaces must refuse (C-FIND 0xA900, QIDO 400)."""

    name: str
    level: str
    keys: dict[str, str]
    expected: frozenset[str] = frozenset()
    refused: bool = False


def case(name: str, level: str, expected: str, **keys: str) -> Case:
    return Case(name, level, keys, frozenset(expected.split()))


def refused(name: str, level: str, **keys: str) -> Case:
    return Case(name, level, keys, refused=True)


ALL = "S1 S2 S3 S4 S5"
CASES = (
    # Universal matching: an empty value or a lone *.
    case("universal empty", "study", ALL, PatientName=""),
    case("universal star", "study", ALL, StudyDate="*", AccessionNumber="*"),
    # Single values: case-sensitive, except person names.
    case("text exact", "study", "S1", PatientID="PID-1"),
    case("text is case-sensitive", "study", "", PatientID="pid-1"),
    case("text is not a prefix", "study", "", PatientID="PID"),
    case("sql wildcards are literal", "study", "S1", AccessionNumber="ACC_1%"),
    case("percent is literal", "study", "S3", StudyDescription="50% dose"),
    case("percent matches itself only", "study", "", StudyDescription="5% dose"),
    case("list of text values", "study", "S2 S3", AccessionNumber="ACC11\\acc_1%"),
    # Wildcards * and ?.
    case("star", "study", "S1", AccessionNumber="ACC_1*"),
    case("question mark", "study", "S2", AccessionNumber="ACC?1"),
    case("wildcards are case-sensitive", "study", "S3", AccessionNumber="acc*"),
    case("leading star", "study", "S1", StudyDescription="*chest"),
    case("brackets are literal", "study", "", AccessionNumber="[A]*"),
    case("question mark on any id", "study", ALL, PatientID="PID-?"),
    # Empty-value matching: "" matches a value that is empty or missing.
    case("empty value", "study", "S2", StudyDescription='""'),
    case("empty date", "study", "S4", StudyDate='""'),
    # Person names: case-insensitive, trailing empty components ignored, component groups.
    case("name any case", "study", "S1", PatientName="doe^jane"),
    case("name wildcard", "study", "S1 S2", PatientName="doe*"),
    case("name question marks", "study", "S1 S2", PatientName="d?e^j*"),
    case("name trailing star", "study", "S5", PatientName="*ann"),
    case("stored trailing carets", "study", "S2", PatientName="DOE^JOHN"),
    case("query trailing caret", "study", "S1", PatientName="Doe^Jane^"),
    case("name non-ASCII case", "study", "S3", PatientName="MÜLLER^HANS"),
    case("name non-ASCII wildcard", "study", "S3", PatientName="müller*"),
    case("alphabetic group alone", "study", "S4", PatientName="YAMADA^TAROU"),
    case("ideographic group alone", "study", "S4", PatientName="山田^太郎"),
    case("ideographic wildcard", "study", "S4", PatientName="山田*"),
    case("groups by position", "study", "S4", PatientName="Yamada*=山田^太郎"),
    case("empty first group", "study", "S4", PatientName="=山田*"),
    case("whole name", "study", "S4", PatientName="yamada^tarou=山田^太郎=やまだ^たろう"),
    case("referring physician", "study", "S2", ReferringPhysicianName="WHO^EVER"),
    # Dates: single values and ranges, open on either side.
    case("date", "study", "S1 S5", StudyDate="20240115"),
    case("date range", "study", "S1 S2 S5", StudyDate="20240101-20240131"),
    case("date range open start", "study", "S3", StudyDate="-20231231"),
    case("date range open end", "study", "S2", StudyDate="20240116-"),
    # Times: a partial time covers what it starts; stored precision varies.
    case("time minute", "study", "S1 S5", StudyTime="0930"),
    case("time hour", "study", "S2", StudyTime="15"),
    case("time range", "study", "S1 S4 S5", StudyTime="0900-1100"),
    case("time range open end", "study", "S3", StudyTime="2300-"),
    case("time with fraction", "study", "S1 S5", StudyTime="-093000.000"),
    case("time fraction excludes", "study", "", StudyTime="235959.7"),
    case("time fraction includes", "study", "S3", StudyTime="235959.5"),
    # UID lists; modalities of any series.
    case("uid list", "study", "S1 S3", StudyInstanceUID="{S1}\\{S3}"),
    case("uid one", "study", "S2", StudyInstanceUID="{S2}"),
    case("modalities one", "study", "S1 S5", ModalitiesInStudy="MR"),
    case("modalities list", "study", "S1 S2 S5", ModalitiesInStudy="CT\\MR"),
    case("modalities wildcard", "study", "S1 S5", ModalitiesInStudy="M*"),
    case("modalities and name", "study", "S1", ModalitiesInStudy="MR", PatientName="doe*"),
    # Series: own keys and the study's.
    case("series modality", "series", "S1b S5a", Modality="MR"),
    case("series modality list", "series", "S1a S2a S3a", Modality="CT\\US"),
    case("series number", "series", "S1b", SeriesNumber="2"),
    case("series numbers", "series", "S1b S3a", SeriesNumber="2\\7"),
    case("series of a study", "series", "S1a S1b", StudyInstanceUID="{S1}"),
    case("series by name", "series", "S1a S1b S2a", PatientName="doe*"),
    case("series description", "series", "S1a", SeriesDescription="axial*"),
    case("series date and time", "series", "S1b", SeriesDate="20240101-",
         SeriesTime="0940-0950"),
    case("body part", "series", "S1a", BodyPartExamined="CHEST"),
    # Instances.
    case("instance number", "instance", "S1a2", InstanceNumber="2",
         SeriesInstanceUID="{S1a}"),
    case("sop class", "instance", "S1a1 S1a2 S2a1", SOPClassUID=CTImageStorage),
    case("sop instance list", "instance", "S1a1 S5a1", SOPInstanceUID="{S1a1}\\{S5a1}"),
    case("instances by study keys", "instance", "S1b1 S5a1", Modality="MR",
         StudyDate="20240115"),
    case("acquisition date-time", "instance", "S1a2",
         AcquisitionDateTime="20240115093030-20240115093130"),
    case("acquisition date-time partial", "instance", "S1a1 S1a2",
         AcquisitionDateTime="2024"),
    # Refused by both: wildcards in UIDs, malformed dates and times, numbers that are not.
    refused("uid wildcard", "study", StudyInstanceUID="1.2.*"),
    refused("short date", "study", StudyDate="2024"),
    refused("bad time", "study", StudyTime="25"),
    refused("not a number", "series", SeriesNumber="two"),
)
