"""QIDO-RS matching (PS3.4 C.2.2.2) as SQL conditions over the studies view: single value,
wildcards ``*`` and ``?``, DA/TM/DT ranges, UID lists (comma or backslash), case-insensitive
person names, whole numbers. Values are always SQL parameters.

Text matching is case-sensitive except for person names; SQLite uses GLOB (its LIKE ignores
case), PostgreSQL uses LIKE, so both engines give the same answers. An empty value or a lone
``*`` matches everything (universal matching) and adds no condition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from web.dicomweb.qido_keys import Key

MAX_LIST = 200  # values in one UID list
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_DATETIME = re.compile(r"^[0-9]{4}([0-9]{2}){0,5}(\.[0-9]{1,6})?([+-][0-9]{4})?$")
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


class MatchError(ValueError):
    """A matching value this attribute cannot take (the message names no value)."""


@dataclass(frozen=True)
class Condition:
    sql: str
    params: tuple[Any, ...]


def condition(key: Key, value: str, dialect: str) -> Condition | None:
    """The SQL condition for ``key`` = ``value``; None for universal matching."""
    if value == "" or value == "*":
        return None
    if not key.matchable:
        raise MatchError(f"{key.keyword} is a return key and cannot be matched on")
    if key.keyword == "ModalitiesInStudy":
        return _modalities(value)
    match key.vr:
        case "UI":
            return _uid_list(key.column, value)
        case "DA":
            return _range(key.column, value, _DATE, "a date (YYYYMMDD) or date range", 8)
        case "TM":
            return _range(_normal_time(key.column), value, _TIME,
                          "a time (HHMMSS) or time range", 6)
        case "DT":
            return _range(_normal_datetime(key.column), value, _DATETIME,
                          "a date-time (YYYYMMDDHHMMSS) or range", 14)
        case "IS" | "US":
            return _number(key, value)
        case "PN":
            return _text(key.column, value, dialect, fold_case=True)
        case "CS" if key.keyword == "Modality" and ("\\" in value or "," in value):
            return _in_list(key.column, _codes(value))
        case _:
            return _text(key.column, value, dialect, fold_case=False)


def _split_list(value: str) -> list[str]:
    items = [v.strip() for v in re.split(r"[,\\]", value)]
    if not all(items) or len(items) > MAX_LIST:
        raise MatchError(f"a list of at most {MAX_LIST} non-empty values is expected")
    return items


def _uid_list(column: str, value: str) -> Condition:
    uids = _split_list(value)
    if not all(_UID.match(u) and len(u) <= 64 for u in uids):
        raise MatchError("a UID or a list of UIDs (separated by , or \\) is expected;"
                         " wildcards are not allowed")
    return _in_list(column, uids)


def _in_list(column: str, values: list[str]) -> Condition:
    if len(values) == 1:
        return Condition(f"{column} = ?", (values[0],))
    return Condition(f"{column} IN ({', '.join('?' * len(values))})", tuple(values))


def _codes(value: str) -> list[str]:
    codes = _split_list(value)
    if not all(_CODE.match(c) for c in codes):
        raise MatchError("a code or list of codes (such as CT\\MR) is expected")
    return codes


def _modalities(value: str) -> Condition:
    """A study matches when any of its series has one of the modalities."""
    inner = _in_list("m.modality", _codes(value))
    return Condition("EXISTS (SELECT 1 FROM series m WHERE m.study_instance_uid"
                     f" = st.study_instance_uid AND {inner.sql})", inner.params)


def _normal_time(column: str) -> str:
    """HHMMSS of a stored TM value (colons of old-style values removed, missing parts 0)."""
    return f"substr(replace({column}, ':', '') || '000000', 1, 6)"


def _normal_datetime(column: str) -> str:
    return f"substr({column} || '00000000000000', 1, 14)"


def _bound(text: str, width: int, fill: str) -> str:
    digits = text.split(".", 1)[0]
    digits = re.split(r"[+-]", digits, maxsplit=1)[0]
    return (digits + fill * width)[:width]


def _range(column: str, value: str, pattern: re.Pattern[str], what: str,
           width: int) -> Condition:
    """Single value or range ``a-b``, ``a-``, ``-b`` (inclusive); partial times and date-times
    cover everything they start (``10-10`` is 10:00:00 to 10:59:59).
    """
    low, dash, high = value.partition("-")
    if pattern is _DATETIME and value[:1] != "-" and dash and value.count("-") > 1:
        low, _, high = value.rpartition("-")  # a negative offset in the first bound
    parts = [p for p in (low, high) if p]
    if not parts or not all(pattern.match(p) for p in parts):
        raise MatchError(f"{what} is expected")
    if not dash:
        return Condition(f"{column} >= ? AND {column} <= ?",
                         (_bound(low, width, "0"), _bound(low, width, "9")))
    clauses, params = [], []
    if low:
        clauses.append(f"{column} >= ?")
        params.append(_bound(low, width, "0"))
    if high:
        clauses.append(f"{column} <= ?")
        params.append(_bound(high, width, "9"))
    return Condition(" AND ".join(clauses), tuple(params))


def _number(key: Key, value: str) -> Condition:
    try:
        number = int(value)
    except ValueError:
        raise MatchError("a whole number is expected") from None
    if not -(2**31) <= number < 2**31:
        raise MatchError("the number is out of range")
    return Condition(f"{key.column} = ?", (number,))


def _text(column: str, value: str, dialect: str, fold_case: bool) -> Condition:
    """Names ignore case and empty trailing components (``DOE^JOHN^^`` is ``DOE^JOHN``)."""
    if len(value) > 256:
        raise MatchError("the value is too long")
    subject, param = column, "?"
    if fold_case:
        subject, param = f"UPPER(rtrim({column}, '^ '))", "UPPER(?)"
        value = value.rstrip("^ ") or value
    if "*" not in value and "?" not in value:
        return Condition(f"{subject} = {param}", (value,))
    if dialect == "sqlite":
        return Condition(f"{subject} GLOB {param}", (value.replace("[", "[[]"),))
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = escaped.replace("*", "%").replace("?", "_")
    return Condition(f"{subject} LIKE {param} ESCAPE '\\'", (pattern,))
