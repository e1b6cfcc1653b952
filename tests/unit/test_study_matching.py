"""The studies view's matching engine (projections/matching.py) on SQLite without a server: the
shared table of cases (tests/matching_cases.py) straight through the engine, the forms of
date-times, and the promise that SQL only narrows where Python decides (person names, times
to a fraction of a second), checked with generated names and times.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections import matching
from projections.db import SqliteViews
from projections.matching import ATTRIBUTES, MatchError, condition, fetch, where
from projections.studies import StudiesView
from tests.matching_cases import CASES, SOP_CLASSES, STUDIES, Case

LEVEL_SQL = {
    "study": ("st.study_instance_uid", "studies st"),
    "series": ("se.series_instance_uid",
               "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid"),
    "instance": ("i.sop_instance_uid",
                 "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
                 " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"),
}


UIDS = {label: f"1.2.{n}" for n, label in enumerate(
    [s.label for s in STUDIES] + [r.label for s in STUDIES for r in s.series]
    + [f"{r.label}{n}" for s in STUDIES for r in s.series
       for n in range(1, len(r.instances) + 1)], start=1)}
LABELS = {uid: label for label, uid in UIDS.items()}


def _insert(cur: sqlite3.Cursor, table: str, values: dict[str, object]) -> None:
    cur.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES"
                f" ({', '.join('?' * len(values))})", tuple(values.values()))


def _columns(attrs: dict[str, object], table: str) -> dict[str, object]:
    return {ATTRIBUTES[k].column.split(".")[1]: v for k, v in attrs.items()
            if ATTRIBUTES[k].table == table}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqliteViews]:
    """The table's studies as the studies view holds them; UIDs are the labels."""
    views = SqliteViews(tmp_path_factory.mktemp("view") / "view_studies.sqlite")
    with views.transaction() as cur:
        StudiesView().create(cur, "sqlite")
        for study in STUDIES:
            modalities = "\\".join(sorted({s.modality for s in study.series}))
            _insert(cur, "studies", {"study_instance_uid": UIDS[study.label],
                                     "modalities": modalities, "updated_at": 0,
                                     **_columns(study.attrs, "study")})
            for series in study.series:
                _insert(cur, "series", {
                    "series_instance_uid": UIDS[series.label],
                    "study_instance_uid": UIDS[study.label],
                    "modality": series.modality, "series_number": series.number,
                    "updated_at": 0, **_columns(series.attrs, "series")})
                for n, extra in enumerate(series.instances, start=1):
                    _insert(cur, "instances", {
                        "sop_instance_uid": UIDS[f"{series.label}{n}"],
                        "series_instance_uid": UIDS[series.label],
                        "study_instance_uid": UIDS[study.label],
                        "sop_class_uid": SOP_CLASSES[series.modality], "sha256": "0",
                        "size": 1, "job_id": "j", "received_at": 0,
                        **_columns(extra, "instance")})
    yield views
    views.close()


def run(db: SqliteViews, level: str, **keys: str) -> frozenset[str]:
    conditions = [c for k, v in keys.items()
                  if (c := condition(ATTRIBUTES[k], v.split("\\"))) is not None]
    found = where(conditions, db.dialect)
    uid, tables = LEVEL_SQL[level]
    sql = f"SELECT {', '.join([f'{uid} AS uid', *found.columns()])} FROM {tables}"
    if found.clauses:
        sql += " WHERE " + " AND ".join(found.clauses)
    return frozenset(LABELS[r["uid"]] for r in fetch(db, sql + f" ORDER BY {uid}", found.params,
                                             found, 1000))


def _uids(text: str) -> str:
    for label, uid in sorted(UIDS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace("{" + label + "}", uid)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_shared_cases_through_the_engine(db: SqliteViews, case: Case) -> None:
    keys = {k: _uids(v) for k, v in case.keys.items()}
    if case.refused:
        with pytest.raises(MatchError):
            run(db, case.level, **keys)
    else:
        assert run(db, case.level, **keys) == case.expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2024", "S1a1 S1a2"),
    ("20240115093100", "S1a2"),
    ("20240115093100.4", ""),
    ("20240115093100.5", "S1a2"),
    ("-20240115093000", "S1a1"),
    ("20240115093000.5-", "S1a2"),
    ("20240115093000+0100-20240115093030-0100", "S1a1"),
])
def test_date_time_forms(db: SqliteViews, value: str, expected: str) -> None:
    assert run(db, "instance", AcquisitionDateTime=value) == frozenset(expected.split())


def test_paging_with_python_checks_counts_only_matches(db: SqliteViews) -> None:
    found = where([c for c in [condition(ATTRIBUTES["PatientName"], ["*a*"])] if c], "sqlite")
    assert found.checks  # names are decided in Python
    sql = f"SELECT st.study_instance_uid AS uid, {', '.join(found.columns())} FROM studies st" \
          f" WHERE {' AND '.join(found.clauses)} ORDER BY uid"
    every = [LABELS[r["uid"]] for r in fetch(db, sql, found.params, found, 100)]
    assert every == ["S1", "S3", "S4", "S5"]
    assert [LABELS[r["uid"]] for r in fetch(db, sql, found.params, found, 2, 1)] == every[1:3]


def test_postgresql_patterns_escape_like_characters() -> None:
    found = where([c for c in [condition(ATTRIBUTES["AccessionNumber"], ["A_1%*\\?"[:5]]),
                               condition(ATTRIBUTES["PatientName"], ["d%e*"])] if c],
                  "postgres")
    assert found.clauses[0] == "st.accession_number LIKE ? ESCAPE '\\'"
    assert found.params[0] == "A\\_1\\%%"
    assert found.clauses[1] == "(st.patient_name ILIKE ? ESCAPE '!')"
    assert found.params[1] == "%d!%e%%"


# -- SQL narrows, Python decides: generated names and times ----------------------------------

_NAME_CHARS = st.sampled_from([*"aAbBzZ^= *?%_!üÜßİ\u212a山", " ^", "^^", "=="])
_names = st.lists(_NAME_CHARS, max_size=8).map("".join)
_memory = sqlite3.connect(":memory:")


def _like(stored: str, pattern: str) -> bool:
    return bool(_memory.execute("SELECT ? LIKE ? ESCAPE '!'", (stored, pattern)).fetchone()[0])


@settings(max_examples=400, deadline=None)
@given(asked=_names, stored=_names)
def test_sql_keeps_every_name_python_matches(asked: str, stored: str) -> None:
    if matching._name_matches(asked, stored):
        assert _like(stored, matching._name_like(asked)), (asked, stored)


_times = st.builds(lambda h, m, s, f: f"{h:02d}{m}{s and m and s + f}",
                   st.integers(0, 23), st.sampled_from(["", "00", "30", "59"]),
                   st.sampled_from(["", "00", "59"]),
                   st.sampled_from(["", ".5", ".000", ".999999"]))


@settings(max_examples=300, deadline=None)
@given(asked=_times, other=_times, stored=_times, form=st.sampled_from(["a", "a-", "-b", "a-b"]))
def test_sql_keeps_every_time_python_matches(asked: str, other: str, stored: str,
                                             form: str) -> None:
    value = form.replace("a", asked).replace("b", other)
    c = condition(ATTRIBUTES["StudyTime"], [value])
    assert c is not None
    sql, params = matching._sql(c, "sqlite")
    kept = _memory.execute(f"SELECT 1 FROM (SELECT ? AS study_time) st WHERE {sql}",
                           (stored, *params)).fetchone()
    if matching._python(c, stored):
        assert kept, (value, stored)
    elif c.exact_in_sql:
        assert not kept, (value, stored)


def test_a_question_mark_over_a_separator_with_spaces_is_kept_by_sql() -> None:
    """Found by the generated cases: '?' matches the "^" of a stored name written with a
    space before it ("a ^aaaa" is the name a^aaaa), which SQL must keep for Python to decide."""
    assert matching._name_matches("a?aaaa", "a ^aaaa")
    assert _like("a ^aaaa", matching._name_like("a?aaaa"))
    assert not _like("b ^aaaa", matching._name_like("a?aaaa"))
