"""DICOM JSON (PS3.18 annex F) for values from the studies view, and responses with the exact
media type ``application/dicom+json`` (aiohttp's json_response would add a charset, which some
clients refuse).

An attribute without a value is left out of search results altogether: clients such as OHIF
read ``Value`` of every attribute they are given.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

MEDIA_TYPE = "application/dicom+json"
_NUMBERS = {"IS", "US", "UL", "SS", "SL", "SV", "UV"}
_DECIMALS = {"DS", "FL", "FD"}
_SINGLE = {"LT", "ST", "UT", "UR"}  # a backslash in these is text, not a value separator


def person_name(value: str) -> dict[str, str] | None:
    groups = value.split("=")
    names = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))
    found = {k: v for k, v in names.items() if v}
    return found or None


def _number(text: str, vr: str) -> int | float | None:
    try:
        return int(text) if vr in _NUMBERS else float(text)
    except ValueError:
        return None


def values(vr: str, raw: Any) -> list[Any] | None:
    """The ``Value`` array for a stored value (text with backslashes, or a number); None when
    there is nothing to say.
    """
    if raw is None:
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return [raw]
    text = str(raw)
    items = [text] if vr in _SINGLE else text.split("\\")
    out: list[Any] = []
    for item in items:
        item = item.strip(" \x00") if vr != "UR" else item
        if vr == "PN":
            out.append(person_name(item) if item else None)
        elif vr in _NUMBERS or vr in _DECIMALS:
            out.append(_number(item, vr) if item else None)
        else:
            out.append(item or None)
    return out if any(v is not None for v in out) else None


def element(vr: str, raw: Any) -> dict[str, Any] | None:
    found = values(vr, raw)
    return {"vr": vr, "Value": found} if found is not None else None


def dicom_json_response(body: bytes | list[Any], headers: dict[str, str] | None = None,
                        warnings: list[str] | None = None) -> web.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = web.Response(body=data, headers={"Content-Type": MEDIA_TYPE, **(headers or {})})
    for text in warnings or ():
        response.headers.add("Warning", warning(text))
    return response


def warning(text: str) -> str:
    """An HTTP Warning value (RFC 7234): code 299, our agent name, the quoted text."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 dicom-router "{quoted}"'
