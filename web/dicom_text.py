"""DICOM values written for people, as Jinja filters (``pn``, ``da``, ``tm``, ``dt``): person
names ``DOE^JOHN^^^`` as "DOE, JOHN", dates ``20240115`` as "2024-01-15" (ISO: unambiguous in
every country), times ``140322.5`` as "14:03:22". A value that is not what its VR says is shown
as it came (the template escapes it); these never raise.
"""

from __future__ import annotations

import re
from typing import Any

_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DATETIME = re.compile(r"^(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def person_name(value: Any) -> str:
    """``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX`` as "FAMILY, GIVEN MIDDLE" (prefix before, suffix
    after); only the first (alphabetic) group of a multi-group name; plain text is kept."""
    text = _text(value)
    if "^" not in text:
        return text
    parts = [p.strip() for p in text.split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    name = f"{family}, {first}" if family and first else family or first
    return f"{name}, {suffix}" if suffix and name else name or suffix


def _valid_date(year: str, month: str, day: str) -> bool:
    return 1 <= int(month) <= 12 and 1 <= int(day) <= 31 and int(year) > 0


def date(value: Any) -> str:
    """DA ``YYYYMMDD`` as ``YYYY-MM-DD``; anything else as it is."""
    text = _text(value)
    found = _DATE.match(text)
    if found is None or not _valid_date(*found.groups()):
        return text
    return "-".join(found.groups())


def time(value: Any) -> str:
    """TM ``HHMMSS.FFFFFF`` (or ``HH``, ``HHMM``) as ``HH:MM:SS`` (fraction dropped)."""
    text = _text(value)
    found = _TIME.match(text)
    if found is None:
        return text
    hours, minutes, seconds = found.group(1), found.group(2), found.group(3)
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return text
    return ":".join(p for p in (hours, minutes or "00", seconds) if p)


def datetime(value: Any) -> str:
    """DT ``YYYYMMDDHHMMSS.FFFFFF&ZZXX`` as ``YYYY-MM-DD HH:MM:SS +ZZXX``."""
    text = _text(value)
    found = _DATETIME.match(text)
    if found is None:
        return text
    day, clock, zone = found.groups()
    shown = date(day)
    if shown == day:  # not a real date
        return text
    if clock:
        formatted = time(clock)
        if formatted == clock:
            return text
        shown += " " + formatted
    return f"{shown} {zone}" if zone else shown


FILTERS = {"pn": person_name, "da": date, "tm": time, "dt": datetime}
