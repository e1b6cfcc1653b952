"""C-FIND matching (PS3.4 C.2.2.2) over the studies view: an identifier becomes SQL over the
``studies``/``series``/``instances`` tables, and each row is checked again in Python.

SQL narrows (indexed, never excludes a row that matches); Python decides, so the result is the
same on SQLite and PostgreSQL: single value, ``*``/``?`` wildcards, date and time ranges, UID
lists, empty-value ``""`` and universal matching. Person names match case-insensitively.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from projections.db import ViewDatabase

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS = {"patient": LEVELS, "study": LEVELS[1:]}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
STATUS_IDENTIFIER_MISMATCH = 0xA900
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")


class QueryError(ValueError):
    """The identifier cannot be answered; the message names the key, never its value."""

    status = STATUS_IDENTIFIER_MISMATCH


@dataclass(frozen=True)
class Key:
    """A matching/return key the studies view can answer."""

    keyword: str
    level: str
    column: str  # SQL expression over st (studies), se (series), i (instances)
    kind: str  # text | pn | uid | date | time | int | list | count

    @property
    def alias(self) -> str:
        return "k_" + self.keyword.lower()


def _keys(level: str, *specs: tuple[str, str, str]) -> list[Key]:
    return [Key(keyword, level, column, kind) for keyword, column, kind in specs]


KEYS: dict[str, Key] = {k.keyword: k for k in [
    *_keys("PATIENT", ("PatientName", "st.patient_name", "pn"),
           ("PatientID", "st.patient_id", "text"),
           ("IssuerOfPatientID", "st.issuer_of_patient_id", "text"),
           ("PatientBirthDate", "st.patient_birth_date", "date"),
           ("PatientSex", "st.patient_sex", "text"),
           ("NumberOfPatientRelatedStudies", "COUNT(*)", "count"),
           ("NumberOfPatientRelatedSeries", "SUM(st.number_of_series)", "count"),
           ("NumberOfPatientRelatedInstances", "SUM(st.number_of_instances)", "count")),
    *_keys("STUDY", ("StudyInstanceUID", "st.study_instance_uid", "uid"),
           ("StudyDate", "st.study_date", "date"), ("StudyTime", "st.study_time", "time"),
           ("AccessionNumber", "st.accession_number", "text"),
           ("StudyID", "st.study_id", "text"),
           ("StudyDescription", "st.study_description", "text"),
           ("ReferringPhysicianName", "st.referring_physician_name", "pn"),
           ("ModalitiesInStudy", "st.modalities", "list"),
           ("NumberOfStudyRelatedSeries", "st.number_of_series", "count"),
           ("NumberOfStudyRelatedInstances", "st.number_of_instances", "count")),
    *_keys("SERIES", ("SeriesInstanceUID", "se.series_instance_uid", "uid"),
           ("Modality", "se.modality", "text"), ("SeriesNumber", "se.series_number", "int"),
           ("SeriesDescription", "se.series_description", "text"),
           ("BodyPartExamined", "se.body_part_examined", "text"),
           ("SeriesDate", "se.series_date", "date"), ("SeriesTime", "se.series_time", "time"),
           ("NumberOfSeriesRelatedInstances", "se.number_of_instances", "count")),
    *_keys("IMAGE", ("SOPInstanceUID", "i.sop_instance_uid", "uid"),
           ("SOPClassUID", "i.sop_class_uid", "uid"),
           ("InstanceNumber", "i.instance_number", "int"), ("Rows", "i.rows_", "int"),
           ("Columns", "i.columns_", "int"), ("NumberOfFrames", "i.number_of_frames", "int")),
]}
# Columns a retrieve needs besides the keys (instance level).
RETRIEVE_COLUMNS = ("i.sha256", "i.transfer_syntax_uid", "i.size")


@dataclass(frozen=True)
class Condition:
    """One matching key: ``op`` is eq, like, in, range or empty; values already parsed."""

    key: Key
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Query:
    """A parsed identifier: level, matching conditions and the keys to return."""

    model: str
    level: str
    conditions: tuple[Condition, ...]
    requested: tuple[str, ...]  # keywords of every element in the identifier (return keys)
    charset: tuple[str, ...] = ()

    def single(self, keyword: str) -> str | None:
        """The one value the query asks for ``keyword`` (for the audit trail), if just one."""
        for c in self.conditions:
            if c.key.keyword == keyword and c.op in ("eq", "in") and len(c.values) == 1:
                return str(c.values[0])
        return None


def keys_at(level: str) -> list[Key]:
    """Keys the view answers at ``level``: those of this level and the levels above."""
    depth = LEVELS.index(level)
    return [k for k in KEYS.values() if LEVELS.index(k.level) <= depth
            and (k.kind != "count" or k.level == level)]


def parse_query(identifier: Dataset, model: str) -> Query:
    """The query an identifier asks, in the ``patient`` or ``study`` root model."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in MODEL_LEVELS[model]:
        raise QueryError(f"QueryRetrieveLevel must be one of {', '.join(MODEL_LEVELS[model])}")
    charset = identifier.get("SpecificCharacterSet", "") or ""
    charset_list = tuple(str(c) for c in (charset if isinstance(charset, MultiValue)
                                          else [charset]) if c)
    requested: list[str] = []
    conditions: list[Condition] = []
    for tag in identifier.keys():  # noqa: SIM118 - iterating decodes before we can catch
        try:
            element = identifier[tag]
        except (ValueError, TypeError, OverflowError):
            raise QueryError(f"element {tag} has an invalid value") from None
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        requested.append(keyword)
        key = KEYS.get(keyword)
        if key is None or key.kind == "count" or LEVELS.index(key.level) > LEVELS.index(level):
            continue  # unsupported or lower-level keys are returned empty, never matched
        condition = parse_condition(key, element.value)
        if condition is not None:
            conditions.append(condition)
    return Query(model, level, tuple(conditions), tuple(requested), charset_list)


def _values(value: Any) -> list[str]:
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip() != ""]


def parse_condition(key: Key, value: Any) -> Condition | None:
    """The condition a key's value asks for; None for universal matching."""
    values = _values(value)
    if not values or values == ["*"]:
        return None
    if values == ['""']:
        return Condition(key, "empty", ())
    if key.kind == "uid":
        if any("*" in v or "?" in v for v in values):
            raise QueryError(f"{key.keyword}: wildcards are not allowed in UIDs")
        return Condition(key, "in", tuple(values))
    if key.kind in ("date", "time"):
        if len(values) != 1:
            raise QueryError(f"{key.keyword}: one value or one range")
        return _range_condition(key, values[0])
    if key.kind == "int":
        if not all(re.fullmatch(r"[+-]?\d+", v) for v in values):
            raise QueryError(f"{key.keyword}: whole numbers only")
        return Condition(key, "in", tuple(int(v) for v in values))
    op = "like" if any("*" in v or "?" in v for v in values) else "in"
    return Condition(key, op, tuple(values))


def _range_condition(key: Key, value: str) -> Condition:
    low, dash, high = value.partition("-")
    check = _check_date if key.kind == "date" else _check_time
    if not dash:
        check(key, value)
        return Condition(key, "eq", (value,))
    if not low and not high:
        raise QueryError(f"{key.keyword}: a range needs at least one end")
    for part in (low, high):
        if part:
            check(key, part)
    return Condition(key, "range", (low or None, high or None))


def _check_date(key: Key, value: str) -> None:
    if not _DATE.match(value):
        raise QueryError(f"{key.keyword}: dates are YYYYMMDD")


def _check_time(key: Key, value: str) -> None:
    m = _TIME.match(value)
    if not m or int(m.group(1)) > 23 or int(m.group(2) or 0) > 59 or int(m.group(3) or 0) > 60:
        raise QueryError(f"{key.keyword}: times are HH[MM[SS[.ffffff]]]")


def time_bounds(value: str) -> tuple[str, str]:
    """The first and last instant a partial time names, as comparable HHMMSS.ffffff text."""
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError("not a DICOM time")
    hh, mm, ss, frac = m.groups()
    low = f"{hh}{mm or '00'}{ss or '00'}.{(frac or '').ljust(6, '0')}"
    high = f"{hh}{mm or '59'}{ss or '59'}.{(frac or '').ljust(6, '9')}"
    return low, high


# -- SQL --------------------------------------------------------------------------------------


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def _sql_condition(c: Condition, dialect: str) -> tuple[str, list[Any]]:
    """SQL that keeps every row the condition matches (perhaps a few more); "" for none."""
    col, kind = c.key.column, c.key.kind
    if c.op == "empty":
        return f"({col} IS NULL OR {col} = '')", []
    if kind == "time":
        return "", []  # stored times vary in precision: Python compares them
    if kind == "list":
        parts = [f"{col} LIKE ? ESCAPE '!'" for _ in c.values]
        return "(" + " OR ".join(parts) + ")", ["%" + _like_pattern(v) + "%" for v in c.values]
    if c.op == "range":
        low, high = c.values
        sql = " AND ".join(part for part, bound in ((f"{col} >= ?", low), (f"{col} <= ?", high))
                           if bound is not None)
        return f"({sql})", [v for v in (low, high) if v is not None]
    if kind == "pn":
        if dialect == "sqlite" and not all(str(v).isascii() for v in c.values):
            return "", []  # SQLite's lower() folds ASCII only
        col = f"lower({col})"
        values: list[Any] = [str(v).lower() for v in c.values]
    else:
        values = list(c.values)
    if c.op == "like":
        return ("(" + " OR ".join(f"{col} LIKE ? ESCAPE '!'" for _ in values) + ")",
                [_like_pattern(v) for v in values])
    return f"{col} IN ({', '.join('?' for _ in values)})", values


_FROM = {
    "PATIENT": "studies st", "STUDY": "studies st",
    "SERIES": "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    "IMAGE": "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
             " JOIN studies st ON st.study_instance_uid = i.study_instance_uid",
}
_ORDER = {"PATIENT": "k_patientid", "STUDY": "k_studydate, k_studytime, k_studyinstanceuid",
          "SERIES": "k_seriesnumber, k_seriesinstanceuid",
          "IMAGE": "k_seriesinstanceuid, k_instancenumber, k_sopinstanceuid"}


def select_sql(query: Query, dialect: str, limit: int, level: str | None = None,
               extra: Iterable[str] = ()) -> tuple[str, list[Any]]:
    """SELECT the candidate rows of ``query`` at ``level`` (default: the query's level)."""
    level = level or query.level
    keys = keys_at(level)
    grouped = level == "PATIENT"
    columns = [f"{k.column} AS {k.alias}" if k.kind == "count" or not grouped
               or k.keyword == "PatientID" else f"MAX({k.column}) AS {k.alias}" for k in keys]
    charset = "MAX(st.specific_character_set)" if grouped else "st.specific_character_set"
    columns.append(f"{charset} AS k_charset")
    columns.extend(f"{c} AS {c.split('.')[-1]}" for c in extra)
    where, params = [], []
    for condition in query.conditions:
        sql, values = _sql_condition(condition, dialect)
        if sql:
            where.append(sql)
            params.extend(values)
    text = f"SELECT {', '.join(columns)} FROM {_FROM[level]}"
    if where:
        text += " WHERE " + " AND ".join(where)
    if grouped:
        text += " GROUP BY st.patient_id"
    text += f" ORDER BY {_ORDER[level]} LIMIT ?"
    return text, [*params, limit]


# -- Python matching --------------------------------------------------------------------------


def _wildcard(value: str, fold: bool) -> re.Pattern[str]:
    pattern = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in value)
    return re.compile(pattern, re.S | (re.I if fold else 0))


def _match_one(c: Condition, stored: Any) -> bool:
    if c.op == "empty":
        return stored is None or str(stored).strip() == ""
    if stored is None or str(stored).strip() == "":
        return False
    kind = c.key.kind
    text = str(stored).strip()
    if kind == "time":
        return _match_time(c, text)
    if c.op == "range":
        low, high = c.values
        return (low is None or text >= low) and (high is None or text <= high)
    if kind == "int":
        try:
            return int(stored) in c.values
        except (TypeError, ValueError):
            return False
    candidates = text.split("\\") if kind == "list" else [text]
    fold = kind == "pn"
    for value in c.values:
        if c.op == "like" or kind == "list":
            rx = _wildcard(str(value), fold)
            if any(rx.fullmatch(s) for s in candidates):
                return True
        elif (text.lower() == str(value).lower()) if fold else text == value:
            return True
    return False


def _match_time(c: Condition, text: str) -> bool:
    try:
        stored = time_bounds(text.replace(":", ""))[0]
    except ValueError:
        return False
    if c.op == "eq":
        low, high = time_bounds(c.values[0])
    else:
        low = time_bounds(c.values[0])[0] if c.values[0] else "000000.000000"
        high = time_bounds(c.values[1])[1] if c.values[1] else "999999.999999"
    return low <= stored <= high


def matches(query: Query, row: dict[str, Any]) -> bool:
    """Whether a candidate row really matches every condition of ``query``."""
    return all(_match_one(c, row.get(c.key.alias)) for c in query.conditions)


class TooManyMatchesError(QueryError):
    """More matches than the SCP answers; the user should narrow the query."""

    status = 0xA700


def run_query(db: ViewDatabase, query: Query, limit: int, level: str | None = None,
              extra: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The rows matching ``query`` (at most ``limit``; TooManyMatchesError beyond that)."""
    sql, params = select_sql(query, db.dialect, limit + 1, level, extra)
    rows = db.query(sql, params)
    if len(rows) > limit:
        raise TooManyMatchesError(f"more than {limit} matches")
    return [row for row in rows if matches(query, row)]


def require_unique_key(query: Query) -> None:
    """C-MOVE/C-GET: the level's unique key must name what to retrieve (no universal match)."""
    keyword = UNIQUE_KEYS[query.level]
    if not any(c.key.keyword == keyword and c.op in ("in", "eq") for c in query.conditions):
        raise QueryError(f"a retrieve at {query.level} level needs {keyword}")


# -- responses --------------------------------------------------------------------------------


def _response_value(key: Key, value: Any) -> Any:
    if value is None or value == "":
        return None
    if key.kind in ("int", "count"):
        return int(value)
    if key.kind == "list":
        return [v for v in str(value).split("\\") if v]
    return str(value)


def response_identifier(query: Query, row: dict[str, Any], retrieve_ae: str) -> Dataset:
    """The C-FIND response for one match: every requested key (empty when unknown), the unique
    keys of this level and above, where to retrieve it, and the character set it needs."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    answered = {k.keyword: k for k in keys_at(query.level)}
    unique = [UNIQUE_KEYS[lv] for lv in LEVELS[LEVELS.index(query.level)::-1]
              if lv in MODEL_LEVELS[query.model]]
    for keyword in dict.fromkeys([*query.requested, *unique, "RetrieveAETitle"]):
        key = answered.get(keyword)
        if key is not None:
            setattr(ds, keyword, _response_value(key, row.get(key.alias)))
        elif keyword == "RetrieveAETitle":
            ds.RetrieveAETitle = retrieve_ae
        elif keyword == "InstanceAvailability":
            ds.InstanceAvailability = "ONLINE"
        else:
            _add_empty(ds, keyword)
    charset = response_charset(query.charset, _texts(ds))
    if charset:
        ds.SpecificCharacterSet = charset
    return ds


def _add_empty(ds: Dataset, keyword: str) -> None:
    # A keyword pydicom cannot hold empty is left out, as PS3.4 allows.
    with contextlib.suppress(TypeError, ValueError):
        setattr(ds, keyword, [] if keyword.endswith("Sequence") else None)


def _texts(ds: Dataset) -> list[str]:
    return [str(e.value) for e in ds if e.VR in ("PN", "LO", "SH", "ST", "LT", "UC", "UT")
            and e.value is not None]


def response_charset(requested: tuple[str, ...], texts: list[str]) -> str | None:
    """The Specific Character Set for a response: none for ASCII (or the one asked for), the
    requested single-byte set when every value fits in it, else UTF-8 (ISO_IR 192)."""
    from pydicom.charset import python_encoding

    wanted = requested[0] if len(requested) == 1 else ""
    if all(t.isascii() for t in texts):
        return wanted or None
    codec = python_encoding.get(wanted)
    if codec and wanted.startswith("ISO_IR") and wanted not in ("ISO_IR 6",):
        try:
            for text in texts:
                text.encode(codec)
            return wanted
        except (UnicodeEncodeError, LookupError):
            pass
    return "ISO_IR 192"
