"""Dataset limits: what the receive path acknowledges, the delivery path can read and send.

pydicom reads sequences recursively (about five Python frames per level of nesting) and keeps
every element of a dataset in memory; our delivery path reads stored objects with it (file and
S3 templates, transcoding, de-identification, DICOMweb). An object nested deeper than that
reader survives, or holding more elements or larger values than memory allows, would be
acknowledged and then never delivered. So every received object is walked once, here, before
it is answered: nesting depth, element count and the size of each value other than pixel data
are checked against one :class:`DatasetLimits`, and an object beyond them is refused (0xC000)
with the limit it broke as the recorded reason.

The walker is not recursive: it keeps its own stack, so no dataset can exhaust ours. It walks
everything, defined-length sequences included (pydicom parses those later, on first use), the
encapsulated pixel data's fragment headers and whatever follows the pixel data, reading the
file only where element headers are (values are seeked over). It is stricter than pydicom
about structure: an item that does not fit its sequence, or a sequence whose items are not
items, is refused here rather than read in some lenient way later.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pydicom.datadict import DicomDictionary

from router.dicom.header import LONG_VRS, HeaderError
from router.settings import IngestSettings

# The defaults are [ingest]'s (router.settings.IngestSettings), chosen so that real objects
# never meet them: pydicom's and pydicom-data's files nest at most 5 levels and hold at most
# about 1300 elements, enhanced multi-frame objects a few hundred thousand; SR content trees
# rarely pass 15 levels. pydicom's reader needs about five Python frames per level (its JSON
# writer four): 64 levels, or the ceiling of 100, stay far from the 1000-frame limit.
_DEFAULTS = IngestSettings()

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
DEFLATE_SYNTAXES = frozenset(("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"))
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_VR_NAMES = {vr[0] << 8 | vr[1]: vr.decode() for vr in LONG_VRS | SHORT_VRS}
_LONG_VR_NAMES = frozenset(vr.decode() for vr in LONG_VRS)
# Public tags pydicom reads as sequences when their VR is implicit or UN.
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_ITEM_BYTES = {True: struct.pack("<HH", 0xFFFE, 0xE000), False: struct.pack(">HH", 0xFFFE, 0xE000)}
# Bytes read at a time for headers beyond what is in memory (past the pixel data: one read
# per fragment, so small).
_WINDOW = 4096


@dataclass(frozen=True)
class DatasetLimits:
    """How deep, how many and how large a received dataset may be (``[ingest]`` settings)."""

    max_depth: int = _DEFAULTS.max_sequence_depth  # sequences within sequences
    max_elements: int = _DEFAULTS.max_elements  # data elements, items and fragments together
    max_value_length: int = _DEFAULTS.max_value_length  # one value other than pixel data

    @classmethod
    def of(cls, ingest: IngestSettings) -> DatasetLimits:
        return cls(ingest.max_sequence_depth, ingest.max_elements, ingest.max_value_length)


class DatasetRefused(HeaderError):
    """The dataset is beyond a limit, or its structure cannot be walked (the message is the
    recorded reason: limits, sizes and tags, never values)."""


class Source(Protocol):
    """A file's bytes by position, as the walker reads them."""

    size: int

    def window(self, pos: int, count: int) -> tuple[bytes | bytearray, int]:
        """A buffer and the file position of its first byte, holding ``[pos, pos + count)``
        (less only where the file ends)."""
        ...


class FileSource:
    """A :class:`Source` over an open file: small reads where headers are, values skipped."""

    def __init__(self, fp: BinaryIO, size: int | None = None) -> None:
        self._fp = fp
        self.size = os.fstat(fp.fileno()).st_size if size is None else size

    def window(self, pos: int, count: int) -> tuple[bytes, int]:
        self._fp.seek(pos)
        return self._fp.read(max(count, _WINDOW)), pos


@dataclass
class Walk:
    """What the walk found at the top level (for the header reader) and how much in all."""

    # (tag, VR or None, length, value position, end) of each top-level element before the
    # pixel data; for an undefined-length sequence ``end`` is after its delimiter.
    top: list[tuple[int, str | None, int, int, int]]
    header_end: int  # where the pixel data element starts (the file size if there is none)
    implicit: bool  # the top level's encoding (pydicom's: the first element decides)
    elements: int


# Frame kinds of the walker's own stack.
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


def walk(source: Source, pos: int, implicit: bool, little: bool,
         limits: DatasetLimits) -> Walk:
    """Walk the dataset from ``pos`` to the end of the file; DatasetRefused (or HeaderError
    for a truncated file) when it is beyond ``limits`` or malformed."""
    order = "<" if little else ">"
    tag_length = struct.Struct(order + "HHL")
    explicit = struct.Struct(order + "HHBBH")
    long_length = struct.Struct(order + "L")
    item_bytes = _ITEM_BYTES[little]
    size = source.size
    max_depth, max_elements = limits.max_depth, limits.max_elements
    max_value = limits.max_value_length
    data: bytes | bytearray = b""
    base = hi = 0
    count = 0
    top: list[tuple[int, str | None, int, int, int]] = []
    header_end = -1
    # The current frame and the enclosing ones: kind, end (-1: undefined length, ended by a
    # delimiter), bound (where it must end at the latest), implicit VR, depth, and for a
    # top-level undefined-length element, its index in ``top``.
    kind, end, bound, imp, depth, open_top = _DATASET, size, size, implicit, 0, -1
    stack: list[tuple[int, int, int, bool, int, int]] = []
    first = True  # at a dataset's first element: pydicom decides its VR encoding there
    top_implicit = implicit
    vr: str | None
    while True:
        if pos >= end >= 0:
            if pos > end:
                raise _malformed(depth)
            if not stack:
                break
            kind, end, bound, imp, depth, open_top = stack.pop()
            first = False
            continue
        if pos + 12 > hi:  # the walk only moves forward: a new window when this one ends
            if pos + 8 > bound:
                raise _truncated(kind) if pos + 8 > size else _malformed(depth, kind)
            data, base = source.window(pos, 12)
            hi = base + len(data)
            if pos + 8 > hi:
                raise _truncated(kind)
        off = pos - base
        if kind == _DATASET:
            if first:
                first = False
                looks_implicit = not (0x40 < data[off + 4] < 0x5B and 0x40 < data[off + 5] < 0x5B)
                if looks_implicit != imp and (depth == 0 or looks_implicit):
                    # pydicom switches: a whole dataset, or an item of an explicit VR dataset
                    # written in implicit VR (PS3.5 6.2.2 allows it for undefined lengths).
                    imp = looks_implicit
                    if depth == 0:
                        top_implicit = imp
            if imp:
                group, element, length = tag_length.unpack_from(data, off)
                start, vr = pos + 8, None
            else:
                group, element, first_vr, second_vr, length = explicit.unpack_from(data, off)
                start = pos + 8
                vr = _VR_NAMES.get(first_vr << 8 | second_vr)
                if vr in _LONG_VR_NAMES:
                    if off + 12 > len(data):
                        raise _truncated(kind)
                    length, start = long_length.unpack_from(data, off + 8)[0], pos + 12
                elif vr is None:
                    if 0x41 <= first_vr <= 0x5A and 0x41 <= second_vr <= 0x5A:
                        vr = chr(first_vr) + chr(second_vr)  # unknown: pydicom's 2-byte length
                    else:  # as pydicom: a VR that is no VR means this element is implicit
                        length = long_length.unpack_from(data, off + 4)[0]
            if group == 0xFFFE:
                if group << 16 | element == ITEM_END and end < 0 < depth:
                    pos += 8
                    kind, end, bound, imp, depth, open_top = stack.pop()
                    first = False
                    continue
                raise _malformed(depth)
            number = group << 16 | element
            count += 1
            if count > max_elements:
                raise _too_many(max_elements)
            if length == UNDEFINED:
                if number in PIXEL_TAGS:
                    new_kind = _FRAGMENTS  # encapsulated: items up to a sequence delimiter
                elif vr not in ("SQ", "UN", None) or (vr is None and not _maybe_sequence(number)):
                    # pydicom would search for a delimiter and read all before it, unlimited.
                    raise DatasetRefused(f"element ({group:04X},{element:04X}) has an undefined "
                                         "length but is neither a sequence nor pixel data")
                else:
                    new_kind = _SEQUENCE
                    if depth >= max_depth:
                        raise _too_deep(max_depth)
                if depth == 0 and header_end < 0:
                    if number in PIXEL_TAGS:
                        header_end = pos
                    else:
                        top.append((number, vr, length, start, -1))
                        open_top = len(top) - 1
                stack.append((kind, end, bound, imp, depth, -1))
                kind, end, pos = new_kind, -1, start
                depth += new_kind == _SEQUENCE
                continue
            value_end = start + length
            if value_end > bound:
                raise _truncated(kind) if value_end > size else _malformed(depth)
            if depth == 0 and header_end < 0:
                if number in PIXEL_TAGS:
                    header_end = pos
                else:
                    top.append((number, vr, length, start, value_end))
            if vr == "SQ" or ((vr is None or vr == "UN") and length and (
                    number in _SQ_TAGS or _is_sequence(number, source, start, length,
                                                       item_bytes))):
                if depth >= max_depth:
                    raise _too_deep(max_depth)
                stack.append((kind, end, bound, imp, depth, -1))
                kind, end, bound, depth, pos = _SEQUENCE, value_end, value_end, depth + 1, start
                continue
            if length > max_value and number not in PIXEL_TAGS:
                raise DatasetRefused(f"element ({group:04X},{element:04X}) has a value of "
                                     f"{length} bytes, more than the {max_value}-byte limit")
            pos = value_end
            continue
        # In a sequence (items) or encapsulated pixel data (fragments).
        group, element, length = tag_length.unpack_from(data, off)
        number = group << 16 | element
        pos += 8
        if number == SEQUENCE_END and end < 0:
            if open_top >= 0:  # a top-level undefined-length element ends here
                number, vr, length, start, _ = top[open_top]
                top[open_top] = (number, vr, length, start, pos)
            kind, end, bound, imp, depth, open_top = stack.pop()
            first = False
            continue
        if number != ITEM:
            raise _malformed(depth, kind)
        count += 1
        if count > max_elements:
            raise _too_many(max_elements)
        if kind == _FRAGMENTS:
            if length == UNDEFINED or pos + length > bound:
                raise HeaderError("pixel data is truncated or malformed")
            pos += length
            continue
        stack.append((kind, end, bound, imp, depth, open_top))
        if length == UNDEFINED:
            end = -1  # ends at its delimiter, within the sequence's bound
        else:
            end = pos + length
            if end > bound:
                raise _truncated(kind) if end > size else _malformed(depth)
            bound = end
        kind, open_top, first = _DATASET, -1, True
    return Walk(top, header_end if header_end >= 0 else size, top_implicit, count)


def _maybe_sequence(number: int) -> bool:
    """Whether pydicom reads an implicit VR element of undefined length as a sequence."""
    return number in _SQ_TAGS or (number >> 16) & 1 == 1 or number & 0xFF00FFFF == 0x50002600 \
        or number not in DicomDictionary


def _is_sequence(number: int, source: Source, start: int, length: int,
                 item_bytes: bytes) -> bool:
    """Whether pydicom may read this implicit VR or UN value (not a public sequence tag) as a
    sequence on first use: a curve's sequence, or a private value that starts with an item
    (pydicom's private dictionary knows many private sequences)."""
    if number & 0xFF00FFFF == 0x50002600:
        return True
    if (number >> 16) & 1 == 0 or length < 8:
        return False
    data, base = source.window(start, 4)
    return data[start - base:start - base + 4] == item_bytes


def _too_deep(limit: int) -> DatasetRefused:
    return DatasetRefused(f"sequences nested deeper than {limit} levels")


def _too_many(limit: int) -> DatasetRefused:
    return DatasetRefused(f"more than {limit} data elements, items and fragments")


def _malformed(depth: int, kind: int = _DATASET) -> DatasetRefused:
    if kind == _FRAGMENTS:
        return DatasetRefused("pixel data is truncated or malformed")
    if depth == 0:
        return DatasetRefused("dataset is malformed (an item or delimiter outside a sequence)")
    return DatasetRefused("a sequence is malformed (its items or lengths do not nest)")


def _truncated(kind: int) -> HeaderError:
    if kind == _FRAGMENTS:
        return HeaderError("pixel data is truncated")
    return HeaderError("dataset is truncated")


def syntax_encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax, as pydicom reads it (an unknown one
    as explicit VR little endian); DatasetRefused for deflate, which would be inflated
    without bound before anything could be checked."""
    if syntax in DEFLATE_SYNTAXES:
        raise DatasetRefused("deflated transfer syntax: not accepted")
    if syntax == _IMPLICIT_LE:
        return True, True
    return False, syntax != _EXPLICIT_BE


def check_file(fp: BinaryIO, limits: DatasetLimits) -> Walk:
    """Walk a whole Part 10 file (file meta, then the dataset) before pydicom reads it."""
    source = FileSource(fp)
    data, _ = source.window(0, 132)
    if len(data) < 132 or data[128:132] != b"DICM":
        raise HeaderError("not a DICOM Part 10 dataset: InvalidDicomError")
    pos, syntax = _walk_meta(source, 132)
    implicit, little = syntax_encoding(syntax)
    return walk(source, pos, implicit, little, limits)


def _walk_meta(source: Source, pos: int) -> tuple[int, str]:
    """The end of the file meta (group 0002, explicit VR little endian) and its transfer
    syntax; no sequences belong there, so none are allowed."""
    syntax = ""
    while pos + 8 <= source.size:
        data, base = source.window(pos, 12)
        off = pos - base
        group, element = struct.unpack_from("<HH", data, off)
        if group != 2:
            break
        vr = data[off + 4:off + 6]
        if vr in LONG_VRS:
            if len(data) < off + 12:
                raise HeaderError("dataset is truncated")
            length, start = struct.unpack_from("<L", data, off + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, off + 6)[0], pos + 8
        if length == UNDEFINED or vr == b"SQ":
            raise DatasetRefused("file meta information holds a sequence")
        if length > 1 << 16:
            raise DatasetRefused("file meta information element longer than 64 KiB")
        if start + length > source.size:
            raise HeaderError("dataset is truncated")
        if element == 0x0010:
            value, value_base = source.window(start, length)
            syntax = bytes(value[start - value_base:start - value_base + length]).decode(
                "ascii", "replace").rstrip("\0 ")
        pos = start + length
    return pos, syntax
