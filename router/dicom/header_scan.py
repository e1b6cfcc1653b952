"""Reading a received object's header without pydicom's file reader, for the C-STORE path.

The elements before the pixel data become pydicom raw elements, exactly as pydicom's reader
makes them (pydicom converts one only when something reads it: routing reads a handful), and
the index attributes are decoded here when their bytes are plain ASCII. pydicom's reader plus
the index conversion cost about 0.7 ms per object, a quarter of the receive path for small
objects; this takes a tenth of that.

Anything this reader does not handle the way pydicom does for certain (no preamble, deflate,
an unknown transfer syntax, an unexpected layout, a truncated file) goes to pydicom's reader
(:func:`router.dicom.header.read_header`): the answer is the same, only slower. An index value
that is not plain ASCII, or whose VR is unusual, is converted by pydicom.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from router.dicom.header import (
    INDEX_KEYWORDS,
    index_attributes,
    index_value,
    read_header,
)
from router.dicom.limits import (
    UNDEFINED,
    VR_NAMES,
    DatasetLimits,
    Walk,
    check_file,
    syntax_encoding,
    walk,
    walk_meta,
)

_FIRST_READ = 1 << 14  # headers are a few KB; more is read only when needed
_FAR_READ = 4096  # past the pixel data: element and fragment headers, one small read each
DEFAULT_LIMITS = DatasetLimits()

# Transfer syntax -> (implicit VR, little endian). Deflate and unknown syntaxes go to pydicom.
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_EXPLICIT_LE_SYNTAXES = frozenset((
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107",
    "1.2.840.10008.1.2.4.108",
))

# Character sets in which plain ASCII bytes (no ESC) decode as ASCII, as pydicom decodes them.
_ASCII_SAFE_CHARSETS = frozenset((
    "", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144",
    "ISO_IR 127", "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
    "ISO 2022 IR 6", "ISO 2022 IR 100",
))
_TEXT_VRS = frozenset(("LO", "SH", "UC"))  # pydicom's convert_text: each value stripped
_STRING_VRS = frozenset(("CS", "AS", "AE", "DA", "TM", "DT", "UI"))  # multi_string
_INTEGER = re.compile(r" *[+-]?[0-9]+ *")
_INDEX_TAGS = tuple((kw, BaseTag(tag), dictionary_VR(tag)) for kw in INDEX_KEYWORDS
                    if (tag := tag_for_keyword(kw)) is not None)
_CHARSET_TAG = BaseTag(0x00080005)
_IDENTITY_TAGS = frozenset((0x00080016, 0x00080018, 0x0020000D, 0x0020000E))

_Elements = dict[BaseTag, DataElement | RawDataElement]


class Readable(Protocol):
    """What the header reader needs of an open file (a file object, or spool's reader)."""

    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...
    def fileno(self) -> int: ...


class _Fallback(Exception):
    """Not read here: pydicom's reader decides."""


@dataclass(frozen=True)
class ScannedHeader:
    """A received object's header (values converted on use) and its index attributes."""

    dataset: Dataset
    index: dict[str, Any]
    # The VR each identity UID was written with (None: implicit VR), as received: pydicom
    # replaces a UN when it converts the value.
    identity_vrs: dict[int, str | None] = field(default_factory=dict)


def scan_header(path: Path, opened: Readable | None = None,
                limits: DatasetLimits = DEFAULT_LIMITS) -> ScannedHeader:
    """The header and index of a received file; HeaderError when read_header raises it, or
    DatasetRefused when the walk of the whole dataset (router.dicom.limits) refuses it.

    Checks, like ``read_header(path, check=True)``, that the file holds all of its elements.
    ``opened`` reads the same file without opening it again (it is not closed here).
    """
    try:
        if opened is not None:
            opened.seek(0)
            return _scan(cast(BinaryIO, opened), limits)
        with path.open("rb") as fp:
            return _scan(fp, limits)
    except (_Fallback, struct.error, UnicodeDecodeError):
        pass
    # pydicom reads it, recursively: only once the walker has seen that it can.
    with path.open("rb") as fp:
        walked = check_file(fp, limits)
    dataset = read_header(path, check=False)  # walked just now
    return ScannedHeader(dataset, index_attributes(dataset), _identity_vrs(walked))


class _Reader:
    """The file's bytes from the start, read further only when the header needs more; the
    walker's windows beyond them (past the pixel data) are small reads of their own."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.size = os.fstat(fp.fileno()).st_size
        self.data = bytearray(fp.read(min(self.size, _FIRST_READ)))

    def need(self, end: int) -> bytearray:
        if end > len(self.data):
            if end > self.size:
                raise _Fallback  # truncated: pydicom's reader names the problem
            self.fp.seek(len(self.data))
            # Doubling: a long header walked element by element is read in few, growing reads.
            self.data += self.fp.read(max(end - len(self.data), len(self.data)))
            if end > len(self.data):
                raise _Fallback  # the file shrank under us
        return self.data

    def window(self, pos: int, count: int) -> tuple[bytes | bytearray, int]:
        if pos + count <= len(self.data):
            return self.data, 0
        if pos <= len(self.data) + _FIRST_READ:
            return self.need(min(pos + count, self.size)), 0
        self.fp.seek(pos)  # far beyond the header (the pixel data was skipped): read a little
        return self.fp.read(max(count, _FAR_READ)), pos


def _scan(fp: BinaryIO, limits: DatasetLimits) -> ScannedHeader:
    reader = _Reader(fp)
    meta_walk, syntax = walk_meta(reader)
    if syntax is None or meta_walk.implicit:
        raise _Fallback  # pydicom guesses the encoding, or reads the file meta as implicit VR
    meta = _meta(reader.need(meta_walk.header_end), meta_walk)
    implicit, little = _encoding(syntax)
    walked = walk(reader, meta_walk.header_end, implicit, little, limits)
    if walked.implicit != implicit:
        raise _Fallback  # pydicom switches VR mode when the first element disagrees
    elements = _elements(bytes(reader.need(walked.header_end)[:walked.header_end]), walked,
                         implicit, little)
    dataset = Dataset(elements)
    dataset.file_meta = FileMetaDataset(meta)
    charset = _charset(elements)
    # As pydicom's reader records it (its default when the element is absent).
    dataset.set_original_encoding(implicit, little, dataset._character_set if charset else
                                  default_encoding)
    return ScannedHeader(dataset, _index(dataset, elements, charset, little),
                         _identity_vrs(walked))


def _identity_vrs(walked: Walk) -> dict[int, str | None]:
    return {number: vr for number, vr, *_ in walked.top if number in _IDENTITY_TAGS}


def _meta(data: bytearray, walked: Walk) -> _Elements:
    """Group 0002 as pydicom's reader makes it, from the walk of the file meta."""
    meta: _Elements = {}
    for number, vr, length, start, end in walked.top:
        if vr not in VR_NAMES:
            raise _Fallback  # unknown VRs: pydicom decides what they are
        tag = BaseTag(number)
        value = bytes(data[start:end]) if length else _empty(vr)
        meta[tag] = RawDataElement(tag, vr, length, value, start, False, True)
    return meta


def _encoding(syntax: str) -> tuple[bool, bool]:
    if syntax == _IMPLICIT_LE:
        return True, True
    if syntax == _EXPLICIT_BE:
        return False, False
    if syntax in _EXPLICIT_LE_SYNTAXES:
        return False, True
    syntax_encoding(syntax)  # deflate is refused
    raise _Fallback  # private or unknown syntaxes


def _elements(header: bytes, walked: Walk, implicit: bool, little: bool) -> _Elements:
    """The top-level elements before the pixel data, as pydicom's reader makes them."""
    elements: _Elements = {}
    for number, vr, length, start, end in walked.top:
        if vr is None:
            if not implicit:
                raise _Fallback  # an implicit element in an explicit dataset: pydicom's
        elif vr not in VR_NAMES:
            raise _Fallback  # unknown VRs: pydicom decides what they are
        if number >> 16 == 2:
            raise _Fallback
        tag = BaseTag(number)
        if length == UNDEFINED:
            # pydicom reads these as sequences already converted; we keep the items' bytes.
            if (vr or _dictionary_vr(number)) != "SQ":
                raise _Fallback
            items = header[start:end - 8]
            elements[tag] = RawDataElement(tag, "SQ", len(items), items, start, implicit, little)
        else:
            # Like pydicom's reader: an empty value is the VR's empty raw value, not b"".
            value: bytes | None = header[start:end] if length else _empty(vr)
            elements[tag] = RawDataElement(tag, vr, length, value, start, implicit, little)
    return elements


def _empty(vr: str | None) -> bytes | None:
    """The raw value pydicom's reader gives an element of length 0."""
    return cast(bytes | None, empty_value_for_VR(vr, raw=True))


def _dictionary_vr(number: int) -> str:
    try:
        return str(dictionary_VR(number))
    except KeyError:
        raise _Fallback from None


def _charset(elements: _Elements) -> str:
    raw = elements.get(_CHARSET_TAG)
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return ""
    return raw.value.decode("ascii", "replace").strip(" \0")


def _index(dataset: Dataset, elements: _Elements, charset: str,
           little: bool) -> dict[str, Any]:
    """As header.index_attributes, decoding plain ASCII values here and the rest with pydicom."""
    ascii_ok = charset in _ASCII_SAFE_CHARSETS
    index: dict[str, Any] = {}
    for keyword, number, dictionary_vr in _INDEX_TAGS:
        raw = elements.get(number)
        if raw is None or not raw.value:
            continue  # missing or empty: pydicom gives "" or None, never indexed
        value = None
        if (ascii_ok and isinstance(raw, RawDataElement) and isinstance(raw.value, bytes)
                and raw.VR in (None, dictionary_vr)):
            value = _decode(raw.value, dictionary_vr, little)
        if value is None:
            value = index_value(dataset, keyword)
        if value not in (None, "", []):
            index[keyword] = value
    return index


def _decode(value: bytes, vr: str, little: bool) -> Any:
    """The value as index_attributes gives it, or None when pydicom must convert it."""
    if vr == "US":
        count, odd = divmod(len(value), 2)
        if odd or not count:
            return None
        shorts = struct.unpack(("<" if little else ">") + "H" * count, value)
        return shorts[0] if count == 1 else list(shorts)
    if not value.isascii() or b"\x1b" in value:
        return None
    text = value.decode("ascii")
    if vr in _TEXT_VRS:
        parts = [part.rstrip("\0 ") for part in text.split("\\")]
    elif vr == "PN":
        parts = text.rstrip("\0 ").split("\\")
    elif vr in _STRING_VRS:
        parts = text.rstrip(" \0").split("\\")
    elif vr == "IS":
        parts = text.rstrip(" \0").split("\\")
        if not all(_INTEGER.fullmatch(part) for part in parts):
            return None
        numbers = [int(part) for part in parts]
        return numbers[0] if len(numbers) == 1 else numbers
    else:
        return None
    return parts[0] if len(parts) == 1 else parts
