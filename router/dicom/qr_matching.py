"""C-FIND over the studies view: an identifier becomes the matching engine's conditions
(projections/matching.py, shared with QIDO-RS), the engine's SQL selects the rows at the
query's level, and each match becomes a response identifier.

The identifier's values are decoded with its Specific Character Set; a multi-valued key asks
for any of its values. Keys of a level below the query's, and keys the view does not keep, are
returned empty and not matched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from projections import cfind_queries, matching
from projections.db import ViewDatabase
from projections.matching import ATTRIBUTES, Condition, MatchError

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS = {"patient": LEVELS, "study": LEVELS[1:]}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
STATUS_IDENTIFIER_MISMATCH = 0xA900


class QueryError(ValueError):
    """The identifier cannot be answered; the message names the key, never its value."""

    status = STATUS_IDENTIFIER_MISMATCH


@dataclass(frozen=True)
class Key:
    """A matching/return key the studies view can answer."""

    keyword: str
    level: str
    column: str  # SQL expression over st (studies), se (series), i (instances)
    kind: str  # text | int | list | count (how its value is returned)

    @property
    def alias(self) -> str:
        return "k_" + self.keyword.lower()


_PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                 "PatientSex")
_LEVEL_OF_TABLE = {"study": "STUDY", "series": "SERIES", "instance": "IMAGE"}


def _key(attribute: matching.Attribute) -> Key:
    level = "PATIENT" if attribute.keyword in _PATIENT_KEYS else _LEVEL_OF_TABLE[attribute.table]
    kind = ("int" if attribute.vr in ("IS", "US") else
            "list" if attribute.keyword == "ModalitiesInStudy" else "text")
    return Key(attribute.keyword, level, attribute.column, kind)


_COUNTS = (Key("NumberOfPatientRelatedStudies", "PATIENT", "COUNT(*)", "count"),
           Key("NumberOfPatientRelatedSeries", "PATIENT", "SUM(st.number_of_series)", "count"),
           Key("NumberOfPatientRelatedInstances", "PATIENT", "SUM(st.number_of_instances)",
               "count"),
           Key("NumberOfStudyRelatedSeries", "STUDY", "st.number_of_series", "count"),
           Key("NumberOfStudyRelatedInstances", "STUDY", "st.number_of_instances", "count"),
           Key("NumberOfSeriesRelatedInstances", "SERIES", "se.number_of_instances", "count"))
# Every attribute the engine matches on (but the character set, which describes the others),
# and the counts, which are returned only.
KEYS: dict[str, Key] = {k.keyword: k for k in [
    *(_key(a) for a in ATTRIBUTES.values() if a.keyword != "SpecificCharacterSet"), *_COUNTS]}
# Columns a retrieve needs besides the keys (instance level).
RETRIEVE_COLUMNS = ("i.sha256", "i.transfer_syntax_uid", "i.size")


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
            values = c.literal() if c.attribute.keyword == keyword else None
            if values is not None and len(values) == 1:
                return values[0]
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
    return ["" if v is None else str(v) for v in items]


def parse_condition(key: Key, value: Any) -> Condition | None:
    """The condition a key's value asks for; None for universal matching."""
    try:
        return matching.condition(ATTRIBUTES[key.keyword], _values(value))
    except MatchError as exc:
        raise QueryError(f"{key.keyword}: {exc}") from None


# -- SQL --------------------------------------------------------------------------------------


def select_sql(query: Query, dialect: str, level: str | None = None,
               extra: Iterable[str] = ()) -> tuple[str, list[Any], matching.Where]:
    """SELECT the candidate rows of ``query`` at ``level`` (default: the query's level), in
    order and without LIMIT, and what the engine still checks in Python."""
    level = level or query.level
    keys = keys_at(level)
    grouped = level == "PATIENT"
    columns = [f"{k.column} AS {k.alias}" if k.kind == "count" or not grouped
               or k.keyword == "PatientID" else f"MAX({k.column}) AS {k.alias}" for k in keys]
    charset = "MAX(st.specific_character_set)" if grouped else "st.specific_character_set"
    columns.append(f"{charset} AS k_charset")
    columns.extend(f"{c} AS {c.split('.')[-1]}" for c in extra)
    found = matching.where(query.conditions, dialect)
    columns.extend(found.columns((lambda c: f"MAX({c})") if grouped else str))
    return cfind_queries.select_text(level, columns, found), list(found.params), found


class TooManyMatchesError(QueryError):
    """More matches than the SCP answers; the user should narrow the query."""

    status = 0xA700


def run_query(db: ViewDatabase, query: Query, limit: int, level: str | None = None,
              extra: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The rows matching ``query`` (at most ``limit``; TooManyMatchesError beyond that)."""
    sql, params, found = select_sql(query, db.dialect, level, extra)
    rows = matching.fetch(db, sql, params, found, limit + 1)
    if len(rows) > limit:
        raise TooManyMatchesError(f"more than {limit} matches")
    return rows


def require_unique_key(query: Query) -> None:
    """C-MOVE/C-GET: the level's unique key must name what to retrieve (no universal match)."""
    keyword = UNIQUE_KEYS[query.level]
    if not any(c.attribute.keyword == keyword and c.literal() for c in query.conditions):
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
