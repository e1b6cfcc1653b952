"""C-FIND matching over the studies view (PS3.4 C.2.2.2): identifiers are encoded and decoded
as they travel in a C-FIND, matched against studies/series/instances rows on SQLite, and the
response identifiers are checked key by key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from projections.db import SqliteViews
from projections.studies import StudiesView
from router.dicom.qr_matching import (
    QueryError,
    TooManyMatchesError,
    parse_query,
    require_unique_key,
    response_charset,
    response_identifier,
    run_query,
)

STUDIES = [
    # uid, patient id, name, birth, study date, time, accession, description, modalities
    ("1.2.1", "P1", "DOE^JOHN", "19700101", "20200115", "093000", "ACC1", "CT chest", "CT\\MR"),
    ("1.2.2", "P1", "DOE^JOHN", "19700101", "20200220", "101500", "acc2", None, "MR"),
    ("1.2.3", "P2", "Müller^Hans", "19800505", "20191231", "1000", "A_3", "50% dose", "US"),
    ("1.2.4", "P3", "山田^太郎", None, "20210301", "235959.5", "ACC4", "Knee", "CR"),
]
SERIES = [("1.2.1.1", "1.2.1", "CT", 1), ("1.2.1.2", "1.2.1", "MR", 2),
          ("1.2.2.1", "1.2.2", "MR", 1), ("1.2.3.1", "1.2.3", "US", 7),
          ("1.2.4.1", "1.2.4", "CR", 1)]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteViews]:
    views = SqliteViews(tmp_path / "view_studies.sqlite")
    with views.transaction() as cur:
        StudiesView().create(cur, "sqlite")
        for uid, pid, name, birth, date, time, acc, desc, mods in STUDIES:
            cur.execute(
                "INSERT INTO studies (study_instance_uid, patient_id, patient_name,"
                " patient_birth_date, study_date, study_time, accession_number,"
                " study_description, modalities, number_of_series, number_of_instances,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 2, 0)",
                (uid, pid, name, birth, date, time, acc, desc, mods))
        for series_uid, study_uid, modality, number in SERIES:
            cur.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality,"
                " series_number, number_of_instances, updated_at) VALUES (?, ?, ?, ?, 2, 0)",
                (series_uid, study_uid, modality, number))
            for n in (1, 2):
                cur.execute(
                    "INSERT INTO instances (sop_instance_uid, series_instance_uid,"
                    " study_instance_uid, sop_class_uid, instance_number, sha256, size, job_id,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?, 10, 'j', 0)",
                    (f"{series_uid}.{n}", series_uid, study_uid,
                     CT_IMAGE if modality == "CT" else MR_IMAGE, n, "0" * 64))
    yield views
    views.close()


def identifier(level: str, charset: str | None = None, **keys: Any) -> Dataset:
    """An identifier as the SCP receives it: encoded by the SCU, decoded by pynetdicom."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    raw = encode(ds, True, True)
    assert raw is not None
    from io import BytesIO

    return decode(BytesIO(raw), True, True)


def find(db: SqliteViews, level: str, model: str = "study", charset: str | None = None,
         **keys: Any) -> list[dict[str, Any]]:
    query = parse_query(identifier(level, charset, **keys), model)
    return run_query(db, query, 100)


def uids(rows: list[dict[str, Any]], key: str = "k_studyinstanceuid") -> list[str]:
    return sorted(str(r[key]) for r in rows)


def test_universal_matching_returns_every_study(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", StudyInstanceUID="", PatientName="")) == [
        "1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    assert len(find(db, "STUDY", PatientName="*")) == 4


def test_single_value_matching_is_exact_and_case_sensitive_except_names(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", PatientID="P1")) == ["1.2.1", "1.2.2"]
    assert uids(find(db, "STUDY", AccessionNumber="ACC1")) == ["1.2.1"]
    assert find(db, "STUDY", AccessionNumber="acc1") == []
    assert find(db, "STUDY", PatientID="P") == []
    assert uids(find(db, "STUDY", PatientName="doe^john")) == ["1.2.1", "1.2.2"]


def test_wildcards_star_and_question_mark(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", PatientName="do*")) == ["1.2.1", "1.2.2"]
    assert uids(find(db, "STUDY", PatientName="?OE^JOH?")) == ["1.2.1", "1.2.2"]
    assert uids(find(db, "STUDY", AccessionNumber="ACC*")) == ["1.2.1", "1.2.4"]
    assert uids(find(db, "STUDY", StudyDescription="*chest")) == ["1.2.1"]


def test_sql_wildcard_characters_in_values_are_literal(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", StudyDescription="50% dose")) == ["1.2.3"]
    assert find(db, "STUDY", StudyDescription="5% dose") == []
    assert uids(find(db, "STUDY", AccessionNumber="A_*")) == ["1.2.3"]
    assert find(db, "STUDY", AccessionNumber="AC_*") == []


def test_date_ranges_and_single_dates(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", StudyDate="20200101-20200131")) == ["1.2.1"]
    assert uids(find(db, "STUDY", StudyDate="-20191231")) == ["1.2.3"]
    assert uids(find(db, "STUDY", StudyDate="20200201-")) == ["1.2.2", "1.2.4"]
    assert uids(find(db, "STUDY", StudyDate="20200220")) == ["1.2.2"]
    assert uids(find(db, "PATIENT", "patient", PatientBirthDate="19700101-19751231"),
                "k_patientid") == ["P1"]


def test_time_ranges_compare_whatever_the_stored_precision(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", StudyTime="0900-1000")) == ["1.2.1", "1.2.3"]
    assert uids(find(db, "STUDY", StudyTime="1015-")) == ["1.2.2", "1.2.4"]
    assert uids(find(db, "STUDY", StudyTime="1000")) == ["1.2.3"]


def test_uid_lists_and_empty_value_matching(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", StudyInstanceUID=["1.2.1", "1.2.3", "9.9"])) == [
        "1.2.1", "1.2.3"]
    assert uids(find(db, "STUDY", StudyDescription='""')) == ["1.2.2"]
    with pytest.raises(QueryError):
        find(db, "STUDY", StudyInstanceUID="1.2.*")


def test_modalities_in_study_match_any_listed_modality(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", ModalitiesInStudy="MR")) == ["1.2.1", "1.2.2"]
    assert uids(find(db, "STUDY", ModalitiesInStudy=["US", "CR"])) == ["1.2.3", "1.2.4"]
    assert find(db, "STUDY", ModalitiesInStudy="M") == []


def test_patient_level_groups_studies_and_counts_them(db: SqliteViews) -> None:
    rows = find(db, "PATIENT", "patient", PatientID="P1", NumberOfPatientRelatedStudies="")
    assert len(rows) == 1
    assert int(rows[0]["k_numberofpatientrelatedstudies"]) == 2
    with pytest.raises(QueryError):
        find(db, "PATIENT", "study", PatientID="P1")


def test_series_and_image_levels_with_integer_keys(db: SqliteViews) -> None:
    rows = find(db, "SERIES", StudyInstanceUID="1.2.1", Modality="MR", SeriesNumber="")
    assert uids(rows, "k_seriesinstanceuid") == ["1.2.1.2"]
    assert uids(find(db, "SERIES", SeriesNumber="7"), "k_seriesinstanceuid") == ["1.2.3.1"]
    images = find(db, "IMAGE", SOPClassUID=CT_IMAGE, InstanceNumber="2")
    assert uids(images, "k_sopinstanceuid") == ["1.2.1.1.2"]


def test_latin1_and_utf8_names_are_decoded_and_matched(db: SqliteViews) -> None:
    assert uids(find(db, "STUDY", charset="ISO_IR 100", PatientName="Müller*")) == ["1.2.3"]
    assert uids(find(db, "STUDY", charset="ISO_IR 100", PatientName="MÜLLER^HANS")) == ["1.2.3"]
    assert uids(find(db, "STUDY", charset="ISO_IR 192", PatientName="山田*")) == ["1.2.4"]


def test_response_charset_follows_the_request_when_values_fit() -> None:
    assert response_charset((), ["DOE^JOHN"]) is None
    assert response_charset(("ISO_IR 100",), ["DOE"]) == "ISO_IR 100"
    assert response_charset(("ISO_IR 100",), ["Müller^Hans"]) == "ISO_IR 100"
    assert response_charset(("ISO_IR 100",), ["山田^太郎"]) == "ISO_IR 192"
    assert response_charset((), ["Müller^Hans"]) == "ISO_IR 192"


def test_response_has_requested_keys_unique_keys_and_empty_unknown_keys(db: SqliteViews) -> None:
    query = parse_query(identifier("SERIES", None, StudyInstanceUID="1.2.3", Modality="",
                                   PatientName="", PatientWeight="", SOPInstanceUID="",
                                   RetrieveAETitle=""), "study")
    row = run_query(db, query, 10)[0]
    ds = response_identifier(query, row, "ROUTER")
    assert ds.QueryRetrieveLevel == "SERIES"
    assert ds.SeriesInstanceUID == "1.2.3.1" and ds.StudyInstanceUID == "1.2.3"
    assert ds.Modality == "US" and str(ds.PatientName) == "Müller^Hans"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "PatientWeight" in ds and not ds.PatientWeight
    assert "SOPInstanceUID" in ds and not ds.SOPInstanceUID  # lower level: returned empty
    assert ds.RetrieveAETitle == "ROUTER"
    assert "PatientID" not in ds  # not a unique key in the Study Root model


def test_response_identifier_encodes_in_the_chosen_character_set(db: SqliteViews) -> None:
    query = parse_query(identifier("STUDY", "ISO_IR 100", PatientName="M*"), "study")
    ds = response_identifier(query, run_query(db, query, 10)[0], "ROUTER")
    raw = encode(ds, False, True)
    assert raw is not None and "Müller".encode("latin-1") in raw
    assert "Müller".encode() not in raw


def test_too_many_matches_and_retrieves_without_a_unique_key_are_refused(
        db: SqliteViews) -> None:
    query = parse_query(identifier("STUDY", None, PatientName=""), "study")
    with pytest.raises(TooManyMatchesError):
        run_query(db, query, 3)
    with pytest.raises(QueryError):
        require_unique_key(query)
    require_unique_key(parse_query(identifier("STUDY", None, StudyInstanceUID="1.2.1"), "study"))
    with pytest.raises(QueryError):
        find(db, "STUDY", StudyDate="2020")
    with pytest.raises(QueryError):
        find(db, "STUDY", StudyTime="25")
