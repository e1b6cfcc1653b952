"""Content negotiation for DICOMweb: the ``Accept`` header parsed into media ranges (quoted and
unquoted parameters, lists, q-values) and the choices each kind of resource can honour.

A choice pairs a media type with a transfer syntax; ``*`` as transfer syntax means "as stored".
Resources decide per instance which choice they can satisfy (see :func:`frame_choice`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydicom.uid import UID

from web.api.common import ApiError

EXPLICIT_LE = "1.2.840.10008.1.2.1"
AS_STORED = "*"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
T = TypeVar("T")
MAX_ACCEPT = 4096  # characters of an Accept header we are willing to parse

# Media types of compressed frames and the transfer syntax each means by default (PS3.18
# table 8.7.3-5); uncompressed frames are application/octet-stream, Explicit VR Little Endian.
FRAME_MEDIA_DEFAULT_TS = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    OCTET_STREAM: EXPLICIT_LE,
}
_TS_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
}


class AcceptError(ApiError):
    """The Accept header cannot be parsed (400) or names nothing we can produce (406)."""


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header, parameters with lower-case names."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def param(self, name: str) -> str | None:
        return self.params.get(name)


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double-quoted strings (which may escape with a backslash)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise AcceptError(400, "Accept header has an unterminated quoted string")
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out, escaped = [], False
        for char in inner:
            if char == "\\" and not escaped:
                escaped = True
                continue
            out.append(char)
            escaped = False
        return "".join(out)
    return value


def _media_range(text: str) -> MediaRange | None:
    pieces = _split(text, ";")
    media_type = pieces[0].strip().lower()
    if not media_type:
        return None
    if media_type.count("/") != 1 or " " in media_type:
        raise AcceptError(400, "Accept header has a malformed media type")
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, sep, value = piece.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise AcceptError(400, "Accept header has a malformed parameter")
        if name == "q":
            q = _quality(_unquote(value))
        else:
            params[name] = _unquote(value)
    return MediaRange(media_type, params, q)


def _quality(value: str) -> float:
    try:
        q = float(value)
    except ValueError:
        raise AcceptError(400, "Accept header has a malformed q-value") from None
    if not 0.0 <= q <= 1.0:
        raise AcceptError(400, "Accept header q-values must be between 0 and 1")
    return q


def accepted(header: str | None, chooser: Callable[[list[MediaRange]], T]) -> T:
    """What ``chooser`` makes of the request's Accept header (AcceptError: 400 or 406)."""
    return chooser(parse_accept(header))


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges by preference (higher q first, then header order); q=0 ones dropped.

    No header (or an empty one) means ``*/*``.
    """
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    if len(header) > MAX_ACCEPT:
        raise AcceptError(400, "Accept header is too long")
    ranges = [r for r in map(_media_range, _split(header, ",")) if r is not None]
    ranges = [r for r in ranges if r.q > 0]
    ranges.sort(key=lambda r: -r.q)  # sort is stable: header order among equal q
    return ranges


def _is_any(media_type: str) -> bool:
    return media_type in ("*/*", "multipart/*")


def dicom_choices(ranges: Sequence[MediaRange]) -> list[str]:
    """Transfer syntaxes acceptable for retrieving instances (multipart of application/dicom),
    best first; ``*`` means as stored. No transfer-syntax parameter means the standard's
    default (Explicit VR Little Endian) when it can be produced, else as stored.
    """
    choices: list[str] = []
    for r in ranges:
        if _is_any(r.media_type):
            choices.append(AS_STORED)
        elif r.media_type == "multipart/related":
            part = (r.param("type") or DICOM).lower()
            if part in (DICOM, "application/*", "*/*"):
                ts = r.param("transfer-syntax")
                choices.extend([ts] if ts else [EXPLICIT_LE, AS_STORED])
    if not choices:
        raise AcceptError(406, 'instances are sent as multipart/related; type="application/dicom"'
                               " (optionally with a transfer-syntax parameter)")
    return choices


def frame_choices(ranges: Sequence[MediaRange]) -> list[tuple[str | None, str]]:
    """(part media type or None for "natural", transfer syntax or ``*``) pairs acceptable for
    frames and pixel bulk data, best first. Frames always come as multipart/related.
    """
    choices: list[tuple[str | None, str]] = []
    for r in ranges:
        if _is_any(r.media_type):
            choices.append((None, AS_STORED))
            continue
        if r.media_type != "multipart/related":
            continue
        part = (r.param("type") or OCTET_STREAM).lower()
        ts = r.param("transfer-syntax")
        if part in ("*/*", "image/*"):
            choices.append((None, ts or AS_STORED))
        elif part in FRAME_MEDIA_DEFAULT_TS:
            choices.append((part, ts or FRAME_MEDIA_DEFAULT_TS[part]))
    if not choices:
        raise AcceptError(406, 'frames are sent as multipart/related; type="application/'
                               'octet-stream" or a compressed image type (image/jp2, ...)')
    return choices


def frame_media(ts: str) -> str:
    """The natural media type of frames in transfer syntax ``ts``."""
    return _TS_MEDIA.get(ts, OCTET_STREAM)


def frame_choice(choices: Sequence[tuple[str | None, str]], stored: str,
                 decodable: bool) -> tuple[str, str] | None:
    """The (media type, transfer syntax) frames of an instance stored in ``stored`` are sent in,
    or None. Uncompressed frames are always Explicit VR Little Endian (byte order fixed here);
    compressed ones are sent as stored or, when ``decodable``, decompressed.
    """
    native = not UID(stored).is_compressed
    out = EXPLICIT_LE if native else stored
    for media, ts in choices:
        if not native and stored not in _TS_MEDIA:  # video: no frames as stored
            if ts == EXPLICIT_LE and media in (None, OCTET_STREAM) and decodable:
                return OCTET_STREAM, EXPLICIT_LE
        elif ts == AS_STORED:
            if media is None or media == OCTET_STREAM or media == frame_media(out):
                return media or frame_media(out), out
        elif ts == out and media in (None, OCTET_STREAM, frame_media(out)):
            return media or frame_media(out), out
        elif ts == EXPLICIT_LE and media in (None, OCTET_STREAM) and decodable:
            return OCTET_STREAM, EXPLICIT_LE
    return None


def json_acceptable(ranges: Sequence[MediaRange]) -> bool:
    return any(r.media_type in (DICOM_JSON, "application/json", "application/*", "*/*")
               for r in ranges)


def rendered_choice(ranges: Sequence[MediaRange]) -> str:
    """image/jpeg or image/png for rendered images and thumbnails."""
    for r in ranges:
        if r.media_type in ("image/jpeg", "image/png"):
            return r.media_type
        if r.media_type in ("image/*", "*/*"):
            return "image/jpeg"
    raise AcceptError(406, "rendered images are available as image/jpeg or image/png")


def dicom_choice(choices: Sequence[str], stored: str, decodable: bool) -> str | None:
    """The transfer syntax an instance stored in ``stored`` is sent in, or None."""
    for ts in choices:
        if ts in (AS_STORED, stored):
            return stored
        if ts == EXPLICIT_LE and decodable:
            return EXPLICIT_LE
    return None
