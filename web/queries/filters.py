"""Query-string filters shared by the jobs and studies reads: bounded text, wildcards turned
into LIKE patterns, dates and instants, and the one error type that names the bad field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from router.application.bulk import BulkFilterError, parse_instant

MAX_TEXT = 128  # no identifier or name we index is longer (PN components are 64 chars)
UID_RE = re.compile(r"^[0-9.]{1,64}$")


class FilterError(ValueError):
    """A filter value cannot be used; ``field`` names it and the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_known(query: Mapping[str, str], known: Iterable[str]) -> None:
    """Refuse parameters nobody reads (a misspelt filter would silently match everything)."""
    allowed = set(known)
    for key in query:
        if key not in allowed:
            raise FilterError(key, "unknown parameter; known: " + ", ".join(sorted(allowed)))


def text(query: Mapping[str, str], field: str, limit: int = MAX_TEXT) -> str | None:
    """A stripped, bounded text value, or None when absent or empty."""
    value = query.get(field, "").strip()
    if not value:
        return None
    if len(value) > limit:
        raise FilterError(field, f"at most {limit} characters")
    if any(ord(ch) < 0x20 for ch in value):
        raise FilterError(field, "control characters are not allowed")
    return value


def uid(query: Mapping[str, str], field: str) -> str | None:
    value = text(query, field, 64)
    if value is not None and not UID_RE.match(value):
        raise FilterError(field, "a DICOM UID is digits and dots, at most 64 characters")
    return value


def choice(query: Mapping[str, str], field: str, allowed: Iterable[str]) -> str | None:
    value = text(query, field)
    options = tuple(allowed)
    if value is not None and value not in options:
        raise FilterError(field, "must be one of " + ", ".join(options))
    return value


def search_name(term: str) -> str:
    """A person name typed as the pages show it ("DOE, JOHN") as DICOM writes it
    ("DOE^JOHN"), for searching: the first comma is the family name's ``^``. A term with a
    ``^`` already, or without a comma, is kept as typed."""
    if "^" in term or "," not in term:
        return term
    family, given = term.split(",", 1)
    return f"{family.strip()}^{given.strip()}"


def like_pattern(value: str, anchor: str = "exact") -> str:
    """A LIKE pattern (escape ``\\``) from a DICOM-style wildcard value: ``*`` any run of
    characters, ``?`` one character. Without wildcards ``anchor`` decides: ``exact``,
    ``prefix`` or ``contains``."""
    wild = "*" in value or "?" in value
    out = []
    for ch in value:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    pattern = "".join(out)
    if wild or anchor == "exact":
        return pattern
    return pattern + "%" if anchor == "prefix" else "%" + pattern + "%"


def instant(query: Mapping[str, str], field: str, end_of_day: bool = False) -> float | None:
    """Unix seconds from ``YYYY-MM-DD`` or an ISO 8601 date-time (UTC unless it says).

    A bare date as an upper bound means the end of that day.
    """
    value = text(query, field, 40)
    if value is None:
        return None
    try:
        return parse_instant(value, field, end_of_day)
    except BulkFilterError as exc:
        raise FilterError(field, exc.message) from None


def dicom_date(query: Mapping[str, str], field: str) -> str | None:
    """A DICOM DA value (YYYYMMDD) from ``YYYY-MM-DD`` or ``YYYYMMDD``."""
    value = text(query, field, 10)
    if value is None:
        return None
    digits = value.replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(value)
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise FilterError(field, "expected a date, YYYY-MM-DD or YYYYMMDD") from None
    return digits


def iso(timestamp: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC string (what the API answers with)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat(timespec="milliseconds"
                                                                    ).replace("+00:00", "Z")


def with_iso_times(value: Any) -> Any:
    """``value`` with every ``*_at`` field (Unix seconds) as an ISO 8601 string, recursively."""
    if isinstance(value, dict):
        return {k: (iso(v) if k.endswith("_at") and isinstance(v, int | float) else
                    with_iso_times(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [with_iso_times(v) for v in value]
    return value
