"""DICOMweb without a server: QIDO matching values (what they mean is the engine's, see
test_study_matching.py), query parsing (includefield, paging, errors), DICOM JSON values,
Accept negotiation, and the metadata entries' bulk data references.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from multidict import MultiDict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from projections.matching import ATTRIBUTES
from web.api.common import ApiError
from web.dicomweb import accept
from web.dicomweb.dicom_json import element, values
from web.dicomweb.matching import MatchError, condition
from web.dicomweb.matching import values as split_values
from web.dicomweb.metadata_cache import dataset_json, with_base
from web.dicomweb.qido import parse_search
from web.dicomweb.qido_keys import BY_KEYWORD, KEYS, find_key

JPEG2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"
LE = accept.EXPLICIT_LE

@pytest.mark.parametrize(("keyword", "value", "message"), [
    ("StudyInstanceUID", "1.2.*", "wildcards are not allowed"),
    ("StudyInstanceUID", "1.2.3,", "non-empty"),
    ("StudyInstanceUID", "1.2.a", "UID"),
    ("StudyDate", "2024-01-15", "date"),
    ("StudyDate", "202401", "date"),
    ("StudyDate", "20240101-2024", "date"),
    ("StudyDate", "20240101\\20240102", "one value or one range"),
    ("StudyTime", "25h", "time"),
    ("StudyTime", "2500", "time"),
    ("AcquisitionDateTime", "2024-01", "date-time"),
    ("InstanceNumber", "two", "whole number"),
    ("InstanceNumber", "99999999999", "out of range"),
    ("PatientID", "x" * 300, "too long"),
])
def test_bad_matching_values_are_refused_without_echoing_them(keyword: str, value: str,
                                                               message: str) -> None:
    with pytest.raises(MatchError) as caught:
        condition(BY_KEYWORD[keyword], value)
    assert message in str(caught.value) and value not in str(caught.value)


def test_lists_split_on_backslash_and_for_uids_and_codes_on_commas() -> None:
    assert split_values(BY_KEYWORD["StudyInstanceUID"], "1.2,1.3\\1.4") == ["1.2", "1.3", "1.4"]
    assert split_values(BY_KEYWORD["ModalitiesInStudy"], "CT,MR") == ["CT", "MR"]
    assert split_values(BY_KEYWORD["AccessionNumber"], "A,1\\B") == ["A,1", "B"]
    assert split_values(BY_KEYWORD["PatientName"], "Doe, J\\Roe") == ["Doe, J", "Roe"]
    found = condition(BY_KEYWORD["StudyInstanceUID"], "1.2,1.3")
    assert found is not None and found.kind == "uid" and found.values == ("1.2", "1.3")
    assert condition(BY_KEYWORD["PatientName"], "") is None
    assert condition(BY_KEYWORD["PatientName"], "*") is None
    empty = condition(BY_KEYWORD["StudyDescription"], '""')
    assert empty is not None and empty.kind == "empty"


def test_counts_are_return_keys_only() -> None:
    with pytest.raises(MatchError):
        condition(BY_KEYWORD["NumberOfStudyRelatedSeries"], "2")
    assert condition(BY_KEYWORD["NumberOfStudyRelatedSeries"], "") is None


def test_every_key_reads_the_engines_column() -> None:
    for key in KEYS:
        if key.matchable:
            assert (key.column, key.vr) == (ATTRIBUTES[key.keyword].column,
                                            ATTRIBUTES[key.keyword].vr)


def test_attribute_names_by_keyword_or_tag() -> None:
    assert find_key("PatientName") is find_key("00100010") is find_key("00100010".lower())
    assert find_key("PatientAge") is None  # a DICOM attribute this index does not keep
    with pytest.raises(ValueError):
        find_key("NotAnAttribute")


def search(level: str = "study", scope: dict[str, str] | None = None, **query: Any) -> Any:
    items = [(k, v) for k, vs in query.items() for v in (vs if isinstance(vs, list) else [vs])]
    return parse_search(MultiDict(items), level, scope or {})


def test_includefield_forms_and_warnings() -> None:
    found = search(includefield=["IssuerOfPatientID,00080021", "all"])
    assert "IssuerOfPatientID" in found.returned and "SeriesDate" not in found.returned
    assert "SeriesDate" in found.warnings[0]
    series = search("series", {"study": "1.2"}, includefield="PatientName")
    assert "PatientName" in series.returned and "PatientBirthDate" not in series.returned
    anywhere = search("series")
    assert "PatientBirthDate" in anywhere.returned  # study attributes of /series
    assert not search(includefield="RetrieveURL,00080056").warnings
    fuzzy = search(fuzzymatching="true")
    assert "literal matching" in fuzzy.warnings[0]


def test_paging_limits_and_errors() -> None:
    assert search().limit == 1000
    capped = search(limit="20000")
    assert capped.limit == 1000 and "maximum" in capped.warnings[0]
    for query in ({"limit": "x"}, {"limit": "0"}, {"offset": "-3"}, {"Foo": "1"},
                  {"PatientID": ["a", "b"]}, {"Rows": "1"}, {"includefield": "Bogus"}):
        with pytest.raises(ApiError) as caught:
            search(**query)
        assert caught.value.status == 400


def test_dicom_json_values_never_empty() -> None:
    assert values("PN", "Doe^Jane=ドウ") == [{"Alphabetic": "Doe^Jane", "Ideographic": "ドウ"}]
    assert values("CS", "CT\\MR") == ["CT", "MR"]
    assert values("CS", "CT\\") == ["CT", None]
    assert values("IS", 5) == [5] and values("DS", "1.5\\2") == [1.5, 2.0]
    assert values("LT", "a\\b") == ["a\\b"]
    for empty in (None, "", "\\", " "):
        assert element("LO", empty) is None
    assert element("PN", "=") is None


@pytest.mark.parametrize(("header", "expected"), [
    (None, ["*"]),
    ('multipart/related; type="application/dicom"', [LE, "*"]),
    ("multipart/related; type=application/dicom; transfer-syntax=*", ["*"]),
    ('multipart/related; type="application/dicom"; transfer-syntax="1.2.840.10008.1.2.1"',
     [LE]),
    (f"multipart/related; type=application/dicom; transfer-syntax={RLE}; q=0.5, "
     f"multipart/related; type=application/dicom; transfer-syntax={LE}", [LE, RLE]),
    (f"multipart/related;type=application/dicom;transfer-syntax={LE};q=0, */*;q=0.1", ["*"]),
    ("Multipart/Related; Type=\"application/dicom\"; transfer-syntax=*", ["*"]),
])
def test_accept_for_instances(header: str | None, expected: list[str]) -> None:
    assert accept.accepted(header, accept.dicom_choices) == expected


@pytest.mark.parametrize(("header", "status"), [
    ("application/dicom", 406),
    ('multipart/related; type="application/dicom+xml"', 406),
    ("multipart/related; type=application/dicom; q=2", 400),
    ('multipart/related; type="application/dicom', 400),
    ("multipart/related; type", 400),
    ("not a media type", 400),
])
def test_accept_errors(header: str, status: int) -> None:
    with pytest.raises(accept.AcceptError) as caught:
        accept.accepted(header, accept.dicom_choices)
    assert caught.value.status == status


def frame_choice(header: str | None, stored: str, decodable: bool = True) -> Any:
    return accept.frame_choice(accept.accepted(header, accept.frame_choices), stored,
                               decodable)


def test_frame_negotiation() -> None:
    octets = "multipart/related; type=application/octet-stream"
    assert frame_choice(f"{octets}; transfer-syntax=*", JPEG2000) == (accept.OCTET_STREAM,
                                                                      JPEG2000)
    assert frame_choice(None, JPEG2000) == ("image/jp2", JPEG2000)
    assert frame_choice(octets, JPEG2000) == (accept.OCTET_STREAM, LE)
    assert frame_choice(octets, JPEG2000, decodable=False) is None
    assert frame_choice('multipart/related; type="image/jp2"', JPEG2000) == ("image/jp2",
                                                                             JPEG2000)
    assert frame_choice('multipart/related; type="image/jpeg"', JPEG2000) is None
    assert frame_choice(f"{octets}; transfer-syntax=*", "1.2.840.10008.1.2") == (
        accept.OCTET_STREAM, LE)
    assert frame_choice(f'multipart/related; type="image/dicom-rle", {octets}; q=0.2',
                        RLE) == ("image/dicom-rle", RLE)
    assert frame_choice(f"{octets}; transfer-syntax=*", MPEG2) is None  # video: no frames
    with pytest.raises(accept.AcceptError):
        accept.accepted("image/jpeg", accept.frame_choices)


def test_rendered_and_metadata_media_types() -> None:
    assert accept.accepted("image/png, image/jpeg;q=0.5", accept.rendered_choice) == "image/png"
    assert accept.accepted("image/*", accept.rendered_choice) == "image/jpeg"
    with pytest.raises(accept.AcceptError):
        accept.accepted("image/gif", accept.rendered_choice)
    assert accept.accepted("application/dicom+json", accept.json_acceptable)
    assert not accept.accepted("application/dicom+xml", accept.json_acceptable)


def test_metadata_entries_reference_bulk_data_by_path() -> None:
    icon = Dataset()
    icon.PixelData = b"\x01" * 5000
    icon["PixelData"].VR = "OB"
    ds = Dataset()
    ds.PatientName = '"BulkDataURI":"x'  # hostile text that looks like the key
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x00291010, "OB", b"\x02" * 10)
    found = dataset_json(ds)
    assert found["00880200"]["Value"][0]["7FE00010"] == {
        "vr": "OB", "BulkDataURI": "bulkdata/00880200/0/7FE00010"}
    assert found["00291010"] == {"vr": "OB", "InlineBinary": "AgICAgICAgICAg=="}
    entry = with_base(orjson.dumps(found), "/dicom-web/studies/1/series/2/instances/3")
    parsed = orjson.loads(entry)
    assert parsed["00100010"]["Value"] == [{"Alphabetic": '"BulkDataURI":"x'}]
    assert parsed["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"] == (
        "/dicom-web/studies/1/series/2/instances/3/bulkdata/00880200/0/7FE00010")
