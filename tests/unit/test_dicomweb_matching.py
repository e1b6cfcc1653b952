"""DICOMweb matching without a server: QIDO conditions run on an in-memory SQLite table, query
parsing (includefield, paging, errors), DICOM JSON values, Accept negotiation, and the
metadata entries' bulk data references.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

import orjson
import pytest
from multidict import MultiDict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from web.api.common import ApiError
from web.dicomweb import accept
from web.dicomweb.dicom_json import element, values
from web.dicomweb.matching import MatchError, condition
from web.dicomweb.metadata_cache import dataset_json, with_base
from web.dicomweb.qido import parse_search
from web.dicomweb.qido_keys import BY_KEYWORD, Key, find_key

JPEG2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"
LE = accept.EXPLICIT_LE

ROWS = [  # (uid, name, accession, date, time, datetime, number)
    ("1.2.1", "Doe^Jane", "ACC_1%", "20240115", "093000", "20240115093000.5+0100", 1),
    ("1.2.2", "DOE^JOHN^^", "ACC11", "20240120", "1530", "2024012015", 2),
    ("1.2.3", "Smith^Ann=スミス", "acc_1%", "20231231", "23", None, None),
    ("1.2.4", None, None, None, "10:15:00", "20231231235959", 3),
]


@pytest.fixture(scope="module")
def table() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (uid TEXT, name TEXT, acc TEXT, d TEXT, tm TEXT, dt TEXT,"
               " n INTEGER)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", ROWS)
    return db


def key(keyword: str, column: str) -> Key:
    return replace(BY_KEYWORD[keyword], column=column)


KEYS = {"uid": key("StudyInstanceUID", "uid"), "name": key("PatientName", "name"),
        "acc": key("AccessionNumber", "acc"), "d": key("StudyDate", "d"),
        "tm": key("StudyTime", "tm"), "dt": key("AcquisitionDateTime", "dt"),
        "n": key("InstanceNumber", "n")}


def matches(db: sqlite3.Connection, column: str, value: str) -> set[str]:
    found = condition(KEYS[column], value, "sqlite")
    where = f" WHERE {found.sql}" if found else ""
    return {r[0] for r in db.execute(f"SELECT uid FROM t{where}", found.params if found else ())}


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("uid", "1.2.1", {"1.2.1"}),
    ("uid", "1.2.1,1.2.3", {"1.2.1", "1.2.3"}),
    ("uid", "1.2.2\\1.2.4", {"1.2.2", "1.2.4"}),
    ("name", "doe^jane", {"1.2.1"}),
    ("name", "Doe^John", {"1.2.2"}),
    ("name", "Doe^John^", {"1.2.2"}),
    ("name", "DOE*", {"1.2.1", "1.2.2"}),
    ("name", "d?e^j??n", {"1.2.2"}),
    ("name", "*ann*", {"1.2.3"}),
    ("name", "*", {"1.2.1", "1.2.2", "1.2.3", "1.2.4"}),
    ("name", "", {"1.2.1", "1.2.2", "1.2.3", "1.2.4"}),
    ("acc", "ACC_1%", {"1.2.1"}),
    ("acc", "ACC_1*", {"1.2.1"}),
    ("acc", "ACC?1", {"1.2.2"}),
    ("acc", "acc*", {"1.2.3"}),
    ("acc", "[A]*", set()),
    ("d", "20240115", {"1.2.1"}),
    ("d", "20240101-20240131", {"1.2.1", "1.2.2"}),
    ("d", "-20231231", {"1.2.3"}),
    ("d", "20240116-", {"1.2.2"}),
    ("tm", "0930", {"1.2.1"}),
    ("tm", "15", {"1.2.2"}),
    ("tm", "0900-1030", {"1.2.1", "1.2.4"}),
    ("tm", "2300-", {"1.2.3"}),
    ("tm", "-093000.000", {"1.2.1"}),
    ("dt", "2024", {"1.2.1", "1.2.2"}),
    ("dt", "20240115093000-20240120", {"1.2.1", "1.2.2"}),
    ("dt", "-20231231235959", {"1.2.4"}),
    ("dt", "2024011509", {"1.2.1"}),
    ("n", "2", {"1.2.2"}),
])
def test_matching_forms_on_sqlite(table: sqlite3.Connection, column: str, value: str,
                                  expected: set[str]) -> None:
    assert matches(table, column, value) == expected


@pytest.mark.parametrize(("column", "value", "message"), [
    ("uid", "1.2.*", "wildcards are not allowed"),
    ("uid", "1.2.3,", "non-empty"),
    ("uid", "1.2.a", "UID"),
    ("d", "2024-01-15", "date"),
    ("d", "202401", "date"),
    ("d", "20240101-2024", "date"),
    ("tm", "25h", "time"),
    ("dt", "2024-01", "date-time"),
    ("n", "two", "whole number"),
    ("n", "99999999999", "out of range"),
])
def test_bad_matching_values_are_refused_without_echoing_them(column: str, value: str,
                                                               message: str) -> None:
    with pytest.raises(MatchError) as caught:
        condition(KEYS[column], value, "sqlite")
    assert message in str(caught.value) and value not in str(caught.value)


def test_postgresql_patterns_escape_like_characters() -> None:
    found = condition(KEYS["acc"], "A_1%*\\?", "postgres")
    assert found is not None
    assert found.sql == "acc LIKE ? ESCAPE '\\'"
    assert found.params == ("A\\_1\\%%\\\\_",)
    name = condition(KEYS["name"], "doe*", "postgres")
    assert name is not None and name.sql == "UPPER(rtrim(name, '^ ')) LIKE UPPER(?) ESCAPE '\\'"


def test_modalities_in_study_matches_any_series() -> None:
    found = condition(BY_KEYWORD["ModalitiesInStudy"], "CT\\MR", "sqlite")
    assert found is not None and "EXISTS" in found.sql and found.params == ("CT", "MR")
    with pytest.raises(MatchError):
        condition(BY_KEYWORD["ModalitiesInStudy"], "ct; DROP", "sqlite")
    with pytest.raises(MatchError):
        condition(BY_KEYWORD["NumberOfStudyRelatedSeries"], "2", "sqlite")


def test_attribute_names_by_keyword_or_tag() -> None:
    assert find_key("PatientName") is find_key("00100010") is find_key("00100010".lower())
    assert find_key("PatientAge") is None  # a DICOM attribute this index does not keep
    with pytest.raises(ValueError):
        find_key("NotAnAttribute")


def search(level: str = "study", scope: dict[str, str] | None = None, **query: Any) -> Any:
    items = [(k, v) for k, vs in query.items() for v in (vs if isinstance(vs, list) else [vs])]
    return parse_search(MultiDict(items), level, scope or {}, "sqlite")


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
