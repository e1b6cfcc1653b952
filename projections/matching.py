"""The one matching engine of the studies view (PS3.4 C.2.2.2), used by C-FIND and QIDO-RS.

An interface parses its request (a DIMSE identifier, a query string) into the values asked per
attribute and calls :func:`condition`; :func:`where` turns the conditions into SQL over the
``studies``/``series``/``instances`` tables (aliases ``st``, ``se``, ``i``), and :func:`fetch`
pages through the rows. The SQL never drops a row that matches. Most conditions are decided
by SQL alone, identically on SQLite and PostgreSQL (SQLite has GLOB, PostgreSQL LIKE with an
escape). Where SQL cannot decide the same way on both (person names: case beyond ASCII,
component groups, trailing empty components; times asked to a fraction of a second) it only
narrows, and a Python check decides; :func:`fetch` applies it before paging.

Matching rules (docs/qr.md lists them): single value, case-sensitive except person names;
``*`` and ``?`` wildcards; ``""`` for an empty or missing value; an empty value or a lone
``*`` matches everything; several values match any of them; UID lists; DA, TM and DT single
values and ranges (open on either side), a partial time or date-time covering what it starts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from projections.db import Row, ViewDatabase

MAX_VALUES = 200  # values in one list
MAX_LENGTH = 256  # characters in one value
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9](([0-5][0-9]|60)(\.[0-9]{1,6})?)?)?$")
_DATETIME = re.compile(r"^[0-9]{4}([0-9]{2}){0,5}(\.[0-9]{1,6})?([+-][0-9]{4})?$")
_EMPTY = '""'


class MatchError(ValueError):
    """A value this attribute cannot be matched with (the message never repeats the value)."""


@dataclass(frozen=True)
class Attribute:
    """An attribute the studies view can match on: where it is stored and its VR."""

    keyword: str
    table: str  # study | series | instance
    column: str  # SQL over st (studies), se (series), i (instances)
    vr: str

    @property
    def alias(self) -> str:
        """The column name of its value in a row that a Python check reads."""
        return "m_" + self.keyword.lower()


def _table(table: str, alias: str, *rows: tuple[str, str, str]) -> list[Attribute]:
    return [Attribute(kw, table, f"{alias}.{column}", vr) for kw, column, vr in rows]


ATTRIBUTES: dict[str, Attribute] = {a.keyword: a for a in [
    *_table("study", "st",
            ("SpecificCharacterSet", "specific_character_set", "CS"),
            ("PatientName", "patient_name", "PN"), ("PatientID", "patient_id", "LO"),
            ("IssuerOfPatientID", "issuer_of_patient_id", "LO"),
            ("PatientBirthDate", "patient_birth_date", "DA"),
            ("PatientSex", "patient_sex", "CS"),
            ("StudyInstanceUID", "study_instance_uid", "UI"),
            ("StudyDate", "study_date", "DA"), ("StudyTime", "study_time", "TM"),
            ("AccessionNumber", "accession_number", "SH"), ("StudyID", "study_id", "SH"),
            ("StudyDescription", "study_description", "LO"),
            ("ReferringPhysicianName", "referring_physician_name", "PN"),
            ("ModalitiesInStudy", "modalities", "CS"),
            ("TimezoneOffsetFromUTC", "timezone_offset_from_utc", "SH")),
    *_table("series", "se",
            ("SeriesInstanceUID", "series_instance_uid", "UI"),
            ("Modality", "modality", "CS"), ("SeriesNumber", "series_number", "IS"),
            ("SeriesDescription", "series_description", "LO"),
            ("BodyPartExamined", "body_part_examined", "CS"),
            ("SeriesDate", "series_date", "DA"), ("SeriesTime", "series_time", "TM"),
            ("PerformedProcedureStepStartDate", "performed_procedure_step_start_date", "DA"),
            ("PerformedProcedureStepStartTime", "performed_procedure_step_start_time", "TM")),
    *_table("instance", "i",
            ("SOPInstanceUID", "sop_instance_uid", "UI"),
            ("SOPClassUID", "sop_class_uid", "UI"),
            ("AvailableTransferSyntaxUID", "transfer_syntax_uid", "UI"),
            ("InstanceNumber", "instance_number", "IS"), ("Rows", "rows_", "US"),
            ("Columns", "columns_", "US"), ("NumberOfFrames", "number_of_frames", "IS"),
            ("BitsAllocated", "bits_allocated", "US"),
            ("AcquisitionDateTime", "acquisition_date_time", "DT")),
]}


@dataclass(frozen=True)
class Condition:
    """What one key asks. ``kind``: empty (``""``), uid, number, text, name or range; for a
    range, ``values`` holds the two bounds as comparable text (None for an open end)."""

    attribute: Attribute
    kind: str
    values: tuple[Any, ...]

    def literal(self) -> tuple[str, ...] | None:
        """The values when they name things exactly (no wildcard, no range), else None."""
        if self.kind in ("uid", "number") or (self.kind == "text" and not any(
                _wild(str(v)) for v in self.values)):
            return tuple(str(v) for v in self.values)
        return None

    @property
    def exact_in_sql(self) -> bool:
        if self.kind == "name":
            return False  # case folding, component groups: see _name_matches
        if self.kind == "range" and self.attribute.vr in ("TM", "DT"):
            return not any(v is not None and "." in v for v in self.values)
        return True


def _wild(value: str) -> bool:
    return "*" in value or "?" in value


def condition(attribute: Attribute, values: Sequence[str]) -> Condition | None:
    """The condition of ``attribute`` asked with ``values`` (several: any may match); None
    for universal matching. MatchError when a value cannot be matched on this attribute."""
    items = [str(v).strip() for v in values]
    if not any(items) or items == ["*"]:
        return None
    if len(items) > MAX_VALUES or not all(items):
        raise MatchError(f"a list of at most {MAX_VALUES} non-empty values is expected")
    if any(len(v) > MAX_LENGTH for v in items):
        raise MatchError("the value is too long")
    if items == [_EMPTY]:
        return Condition(attribute, "empty", ())
    vr = attribute.vr
    if vr == "UI":
        if not all(_UID.match(u) and len(u) <= 64 for u in items):
            raise MatchError("a UID or a list of UIDs is expected; wildcards are not allowed")
        return Condition(attribute, "uid", tuple(items))
    if vr in ("DA", "TM", "DT"):
        if len(items) != 1:
            raise MatchError("one value or one range is expected")
        return _range(attribute, items[0])
    if vr in ("IS", "US"):
        return Condition(attribute, "number", tuple(_number(v) for v in items))
    return Condition(attribute, "name" if vr == "PN" else "text", tuple(items))


def _number(value: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise MatchError("a whole number is expected")
    number = int(value)
    if not -(2**31) <= number < 2**31:
        raise MatchError("the number is out of range")
    return number


# -- dates, times, date-times ---------------------------------------------------------------

_FORMS = {"DA": (_DATE, "a date (YYYYMMDD) or date range", 8),
          "TM": (_TIME, "a time (HHMMSS.FFFFFF) or time range", 6),
          "DT": (_DATETIME, "a date-time (YYYYMMDDHHMMSS.FFFFFF) or range", 14)}


def _range(attribute: Attribute, value: str) -> Condition:
    """A single value or a range ``a-b``, ``a-``, ``-b`` (inclusive); a partial value covers
    everything it starts (``10`` is 10:00:00 to 10:59:59.999999)."""
    pattern, what, _ = _FORMS[attribute.vr]
    low, dash, high = value.partition("-")
    if attribute.vr == "DT":  # a bound may end with a UTC offset, negative too
        low, dash, high = _split_datetime(value)
    if not (low or high) or not all(pattern.match(p) for p in (low, high) if p):
        raise MatchError(f"{what} is expected")
    if not dash:
        high = low
    return Condition(attribute, "range", (_bound(attribute.vr, low, "0") if low else None,
                                          _bound(attribute.vr, high, "9") if high else None))


def _split_datetime(value: str) -> tuple[str, str, str]:
    """(low, "-", high) at the first ``-`` that leaves two valid bounds, else (value, "", "").
    A range is preferred: ``20240101-0500`` is a range, not a time zone."""
    for i, ch in enumerate(value):
        low, high = value[:i], value[i + 1:]
        if ch == "-" and all(_DATETIME.match(p) for p in (low, high) if p):
            return low, "-", high
    return value, "", ""


def _bound(vr: str, text: str, fill: str) -> str:
    """The first (fill 0) or last (fill 9) instant ``text`` names, as comparable text:
    YYYYMMDD for dates, HHMMSS.FFFFFF and YYYYMMDDHHMMSS.FFFFFF otherwise (a UTC offset of a
    date-time is not compared)."""
    width = _FORMS[vr][2]
    text = re.split(r"[+]|(?<=.)-", text, maxsplit=1)[0]
    digits, _, fraction = text.partition(".")
    whole = (digits + fill * width)[:width]
    return whole if vr == "DA" else f"{whole}.{(fraction + fill * 6)[:6]}"


def _stored_instant(vr: str, text: str) -> str | None:
    """A stored TM or DT value as comparable text (colons of old times removed)."""
    text = text.strip().replace(":", "") if vr == "TM" else text.strip()
    pattern = _TIME if vr == "TM" else _DATETIME
    if not pattern.match(text):
        return None
    return _bound(vr, text, "0")


def _instant_sql(attribute: Attribute) -> str:
    """SQL of the whole-second part of a stored TM or DT value (missing digits 0)."""
    column = attribute.column
    if attribute.vr == "TM":
        return f"substr(replace({column}, ':', '') || '000000', 1, 6)"
    return f"substr({column} || '00000000000000', 1, 14)"


# -- person names ---------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Case folded one character at a time: the length is kept and a non-ASCII character never
    becomes ASCII, so SQL's ASCII-only case folding (with ``_`` for the rest) only narrows."""
    if text.isascii():
        return text.lower()
    return "".join(_fold_char(c) for c in text)


def _fold_char(c: str) -> str:
    low = c.lower()
    if c.isascii():
        return low
    return low if len(low) == 1 and not low.isascii() else c


def _groups(name: str) -> list[str]:
    """The component groups of a name, each without spaces around its components and without
    trailing empty components; trailing empty groups dropped (``DOE^JOHN^^`` is
    ``DOE^JOHN``; PS3.5 6.2)."""
    groups = ["^".join(c.strip() for c in g.split("^")).rstrip("^") for g in name.split("=")]
    while groups and groups[-1] in ("", "*"):
        groups.pop()
    return groups


@functools.lru_cache(maxsize=256)
def _pattern(value: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch)
                              for ch in value), re.S)


@functools.lru_cache(maxsize=256)
def _asked(asked: str) -> list[str]:
    return _groups(_fold(asked))


def _name_matches(asked: str, stored: str) -> bool:
    """One asked name against a stored one: a single component group matches any group of
    the stored name (alphabetic, ideographic or phonetic); several are matched group by
    group, an empty or ``*`` group matching anything. Case-insensitive."""
    wanted, have = _asked(asked), _groups(_fold(stored))
    if len(wanted) == 1:
        rx = _pattern(wanted[0])
        return any(rx.fullmatch(g) for g in have)
    return all(w in ("", "*") or _pattern(w).fullmatch(have[i] if i < len(have) else "")
               for i, w in enumerate(wanted))


def _name_like(asked: str) -> str:
    """A LIKE pattern (escape ``!``) that every stored name :func:`_name_matches` keeps."""
    def like(group: str) -> str:
        out = []
        for ch in _fold(group):
            if ch in "!%_":
                out.append("!" + ch)
            elif ch in "*^":
                out.append("%" if ch == "*" else "%^%")
            elif ch == "?":
                # One character of the name without its spaces around "^": in the stored
                # text it may be "^" with spaces beside it ("DOE ^JOHN"), so one or more.
                out.append("_%")
            elif not ch.isascii():
                out.append("_")  # SQL folds ASCII only: any one character
            else:
                out.append(ch)
        return "".join(out)

    # Loose around separators: the stored name may have spaces there, or trailing components.
    return "%" + "%=%".join(like(w) for w in _groups(asked)) + "%"


# -- SQL ------------------------------------------------------------------------------------


def _text_sql(subject: str, values: Sequence[Any], dialect: str) -> tuple[str, list[Any]]:
    """Case-sensitive single values and wildcards, exact on both engines."""
    literal = [v for v in values if not _wild(str(v))]
    parts: list[str] = []
    params: list[Any] = []
    if len(literal) == 1:
        parts.append(f"{subject} = ?")
    elif literal:
        parts.append(f"{subject} IN ({', '.join('?' * len(literal))})")
    params.extend(literal)
    for value in (str(v) for v in values if _wild(str(v))):
        if dialect == "sqlite":  # SQLite's LIKE ignores case; GLOB does not
            parts.append(f"{subject} GLOB ?")
            params.append(value.replace("[", "[[]"))
        else:
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            parts.append(f"{subject} LIKE ? ESCAPE '\\'")
            params.append(escaped.replace("*", "%").replace("?", "_"))
    sql = parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
    return sql, params


def _sql(c: Condition, dialect: str) -> tuple[str, list[Any]]:
    """SQL keeping every row ``c`` matches: exactly those when ``c.exact_in_sql``."""
    column = c.attribute.column
    if c.kind == "empty":
        return f"({column} IS NULL OR {column} = '')", []
    if c.attribute.keyword == "ModalitiesInStudy":  # any series of the study
        inner, params = _text_sql("m.modality", [str(v) for v in c.values], dialect)
        return ("EXISTS (SELECT 1 FROM series m WHERE m.study_instance_uid"
                f" = st.study_instance_uid AND {inner})", params)
    if c.kind in ("uid", "number", "text"):
        return _text_sql(column, list(c.values), dialect)
    if c.kind == "name":
        op = "LIKE" if dialect == "sqlite" else "ILIKE"  # both fold ASCII case
        sql = " OR ".join(f"{column} {op} ? ESCAPE '!'" for _ in c.values)
        return f"({sql})", [_name_like(str(v)) for v in c.values]
    low, high = c.values
    subject, cut = (column, 8) if c.attribute.vr == "DA" else (_instant_sql(c.attribute),
                                                               _FORMS[c.attribute.vr][2])
    parts, params = [], []
    for op, bound in ((">=", low), ("<=", high)):
        if bound is not None:
            parts.append(f"{subject} {op} ?")
            params.append(bound[:cut])
    return "(" + " AND ".join(parts) + ")", params


def _python(c: Condition, stored: Any) -> bool:
    """Whether ``stored`` matches ``c`` (for the conditions SQL only narrows)."""
    if stored is None or str(stored).strip() == "":
        return False
    if c.kind == "name":
        return any(_name_matches(str(v), str(stored)) for v in c.values)
    instant = _stored_instant(c.attribute.vr, str(stored))
    low, high = c.values
    return instant is not None and (low is None or low <= instant) and (
        high is None or instant <= high)


@dataclass(frozen=True)
class Where:
    """SQL conditions (joined with AND) and the checks Python must still make on each row."""

    clauses: tuple[str, ...]
    params: tuple[Any, ...]
    checks: tuple[Condition, ...]

    def columns(self, wrap: Callable[[str], str] = str) -> list[str]:
        """SELECT items the checks read (``wrap`` an aggregate around grouped columns)."""
        seen = dict.fromkeys(c.attribute for c in self.checks)
        return [f"{wrap(a.column)} AS {a.alias}" for a in seen]

    def matches(self, row: Row) -> bool:
        return all(_python(c, row.get(c.attribute.alias)) for c in self.checks)


def where(conditions: Sequence[Condition], dialect: str) -> Where:
    """The SQL of ``conditions`` on ``dialect`` (sqlite or postgres), and what Python decides."""
    clauses, params = [], []
    for c in conditions:
        sql, values = _sql(c, dialect)
        clauses.append(sql)
        params.extend(values)
    return Where(tuple(clauses), tuple(params),
                 tuple(c for c in conditions if not c.exact_in_sql))


_CHUNK = 500  # candidate rows read at a time when Python decides


def fetch(db: ViewDatabase, sql: str, params: Sequence[Any], found: Where, limit: int,
          offset: int = 0) -> list[Row]:
    """Up to ``limit`` matching rows after the first ``offset`` of ``sql`` (an ordered
    SELECT without LIMIT). Without checks, SQL pages; with checks, the candidates are read in
    growing chunks and checked until enough match (a concurrent write between two chunks can
    shift a row, as between two pages)."""
    if not found.checks:
        return db.query(f"{sql} LIMIT ? OFFSET ?", [*params, limit, offset])
    rows: list[Row] = []
    position, chunk = 0, max(_CHUNK, limit + offset)
    while True:
        candidates = db.query(f"{sql} LIMIT ? OFFSET ?", [*params, chunk, position])
        position += len(candidates)
        rows.extend(row for row in candidates if found.matches(row))
        if len(rows) >= offset + limit or len(candidates) < chunk:
            return rows[offset:offset + limit]
        chunk *= 2
