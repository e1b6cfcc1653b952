"""QIDO-RS matching values: a query parameter's text becomes the values of one condition of
the studies view's matching engine (projections/matching.py, shared with C-FIND), which has
the rules (PS3.4 C.2.2.2) and writes the SQL.

What is QIDO's own is how a value is written in a URL: several values are separated by a
backslash, as in DICOM, and UIDs and codes also by commas (PS3.18 8.3.4.1); an empty value
or a lone ``*`` is universal matching.
"""

from __future__ import annotations

import re

from projections import matching
from projections.matching import Condition, MatchError
from web.dicomweb.qido_keys import Key

__all__ = ["Condition", "MatchError", "condition", "values"]


def values(key: Key, text: str) -> list[str]:
    """The values a parameter's text lists."""
    separators = r"[,\\]" if key.vr in ("UI", "CS") else r"\\"
    return re.split(separators, text)


def condition(key: Key, text: str) -> Condition | None:
    """The engine's condition for ``key`` = ``text``; None for universal matching."""
    if text.strip() in ("", "*"):
        return None
    if not key.matchable:
        raise MatchError(f"{key.keyword} is a return key and cannot be matched on")
    return matching.condition(matching.ATTRIBUTES[key.keyword], values(key, text))
