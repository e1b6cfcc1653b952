"""The one walker of DICOM element headers in untrusted bytes, and the dataset limits it keeps.

Every dataset element header the router reads by hand is read here, by :func:`walk` (DIMSE
command sets, group 0000 only, are router.dicom.pdus's): the receipt's walk of a whole object
(below), the file meta's (:func:`walk_meta`: where the data set starts, for our SCU, and its
transfer syntax), and the walk that locates the pixel data element where pydicom's reader stops
before it (:func:`locate_pixels`, for DICOMweb). One parser, so that a parsing bug is fixed once;
it follows pydicom's reader wherever that reader has a rule (where a dataset switches VR
encoding, what an unknown VR is, which values are sequences), and
``tests/unit/test_element_walk.py`` holds it to that on mutated real files.

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
items, is refused here rather than read in some lenient way later. It raises nothing but
:class:`HeaderError` (truncated) and :class:`DatasetRefused` (beyond a limit, or malformed).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pydicom.datadict import DicomDictionary, dictionary_VR

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
# Explicit VR elements with a 4-byte length (PS3.5 7.1.2), and the others.
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"))
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
VR_NAMES = frozenset(vr.decode() for vr in LONG_VRS | SHORT_VRS)  # every VR of PS3.5 6.2
DEFLATE_SYNTAXES = frozenset(("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"))
TRANSFER_SYNTAX = 0x00020010
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_VR_CODES = {vr[0] << 8 | vr[1]: vr.decode() for vr in LONG_VRS | SHORT_VRS}
_LONG_VR_NAMES = frozenset(vr.decode() for vr in LONG_VRS)
# Public tags pydicom reads as sequences when their VR is implicit or UN.
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_ITEM_BYTES = {True: struct.pack("<HH", 0xFFFE, 0xE000), False: struct.pack(">HH", 0xFFFE, 0xE000)}
# By byte order: an implicit VR header (tag, 4-byte length), an explicit VR one (tag, VR bytes,
# 2-byte length) and a 4-byte length.
_STRUCTS = {little: (struct.Struct(order + "HHL"), struct.Struct(order + "HHBBH"),
                     struct.Struct(order + "L")) for little, order in ((True, "<"), (False, ">"))}
# Bytes read at a time for headers beyond what is in memory (past the pixel data: one read
# per fragment, so small).
_WINDOW = 4096


class HeaderError(ValueError):
    """The object is not a DICOM dataset we can parse (the message carries no PHI)."""


class DatasetRefused(HeaderError):
    """The dataset is beyond a limit, or its structure cannot be walked (the message is the
    recorded reason: limits, sizes and tags, never values)."""


@dataclass(frozen=True)
class DatasetLimits:
    """How deep, how many and how large a received dataset may be (``[ingest]`` settings)."""

    max_depth: int = _DEFAULTS.max_sequence_depth  # sequences within sequences
    max_elements: int = _DEFAULTS.max_elements  # data elements, items and fragments together
    max_value_length: int = _DEFAULTS.max_value_length  # one value other than pixel data

    @classmethod
    def of(cls, ingest: IngestSettings) -> DatasetLimits:
        return cls(ingest.max_sequence_depth, ingest.max_elements, ingest.max_value_length)


# Structure only: for objects already stored, or a completeness check (the walk needs no
# stack, so depth costs nothing here; pydicom's reader is what has a limit).
UNLIMITED = DatasetLimits(1 << 62, 1 << 62, 1 << 62)
# The file meta: a few short elements (PS3.10 7.1), no sequences.
_META_LIMITS = DatasetLimits(max_depth=0, max_elements=1 << 12, max_value_length=1 << 16)


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
        self._data, self._base = b"", 0

    def window(self, pos: int, count: int) -> tuple[bytes, int]:
        # The last read again when it holds the range: the preamble's read usually holds the
        # whole file meta and the first elements.
        if not (self._base <= pos and pos + count <= self._base + len(self._data)):
            self._fp.seek(pos)
            self._data, self._base = self._fp.read(max(count, _WINDOW)), pos
        return self._data, self._base


class BytesSource:
    """A :class:`Source` over bytes in memory (a file, or its first bytes: past them it ends)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data
        self.size = len(data)

    def window(self, pos: int, count: int) -> tuple[bytes | bytearray, int]:
        return self._data, 0


# (tag, VR or None when implicit, length, value position, end) of a top-level element; for
# an undefined-length sequence ``end`` is after its delimiter.
Element = tuple[int, str | None, int, int, int]


@dataclass
class Walk:
    """What the walk found at the top level (for the header reader) and how much in all."""

    top: list[Element]  # the top-level elements before the pixel data (or the stop)
    header_end: int  # where the pixel data element starts, or the walk stopped (else the size)
    implicit: bool  # the top level's encoding (pydicom's: the first element decides)
    elements: int
    # The top-level pixel data element (7FE0,0010/0008/0009): its ``end`` is -1 when
    # encapsulated (undefined length) and not walked.
    pixels: Element | None = None


# Frame kinds of the walker's own stack.
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


def walk(source: Source, pos: int, implicit: bool, little: bool, limits: DatasetLimits, *,
         until_pixels: bool = False, group: int = -1, resume: bool = False) -> Walk:
    """Walk the dataset from ``pos`` to the end of the file; DatasetRefused (or HeaderError
    for a truncated file) when it is beyond ``limits`` or malformed.

    ``until_pixels`` stops at the top-level pixel data element, where pydicom's reader stops
    before pixels, without entering sequences of defined length (their ends are known).
    ``group`` stops at the first top-level element of another group (for the file meta).
    ``resume`` starts inside a dataset whose encoding is known (``implicit``: as pydicom's
    reader switched it), not at its first element, where the walk would decide it.
    """
    tag_length, explicit, long_length = _STRUCTS[little]
    item_bytes = _ITEM_BYTES[little]
    size = source.size
    max_depth, max_elements = limits.max_depth, limits.max_elements
    max_value = limits.max_value_length
    data: bytes | bytearray = b""
    base = hi = 0
    count = 0
    top: list[Element] = []
    header_end = -1
    pixels: Element | None = None
    # The current frame and the enclosing ones: kind, end (-1: undefined length, ended by a
    # delimiter), bound (where it must end at the latest), implicit VR, depth, and for a
    # top-level undefined-length element, its index in ``top``.
    kind, end, bound, imp, depth, open_top = _DATASET, size, size, implicit, 0, -1
    stack: list[tuple[int, int, int, bool, int, int]] = []
    first = not resume  # at a dataset's first element: pydicom decides its VR encoding there
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
                tag_group, element, length = tag_length.unpack_from(data, off)
                start, vr = pos + 8, None
            else:
                tag_group, element, first_vr, second_vr, length = explicit.unpack_from(data, off)
                start = pos + 8
                code = first_vr << 8 | second_vr
                vr = _VR_CODES.get(code)
                if vr in _LONG_VR_NAMES:
                    if off + 12 > len(data):
                        raise _truncated(kind)
                    length, start = long_length.unpack_from(data, off + 8)[0], pos + 12
                elif vr is None:
                    if 0x4141 <= code <= 0x5A5A:  # pydicom's b"AA" <= VR <= b"ZZ"
                        vr = chr(first_vr) + chr(second_vr)  # unknown: a 2-byte length
                    else:  # as pydicom: a VR that is no VR means this element is implicit
                        length = long_length.unpack_from(data, off + 4)[0]
            number = tag_group << 16 | element
            if not depth:  # the top level: what the header reader and the callers need
                if group >= 0 and tag_group != group:
                    if number == ITEM_END:
                        pos += 8  # pydicom ends a dataset after a stray item delimiter
                    header_end = pos  # the file meta ends here
                    break
                if header_end < 0:  # (an item or delimiter here is refused below)
                    element_end = -1 if length == UNDEFINED else start + length
                    if number in PIXEL_TAGS:
                        header_end, pixels = pos, (number, vr, length, start, element_end)
                        if until_pixels:
                            break  # located, even if the file ends before its value does
                    else:
                        top.append((number, vr, length, start, element_end))
                        if element_end < 0:
                            open_top = len(top) - 1  # its end: after its delimiter
            if tag_group == 0xFFFE:
                if number == ITEM_END and end < 0 < depth:
                    pos += 8
                    kind, end, bound, imp, depth, open_top = stack.pop()
                    first = False
                    continue
                raise _malformed(depth)
            count += 1
            if count > max_elements:
                raise _too_many(max_elements)
            if length == UNDEFINED:
                if number in PIXEL_TAGS:
                    new_kind = _FRAGMENTS  # encapsulated: items up to a sequence delimiter
                elif vr not in ("SQ", "UN", None) or (vr is None and not _maybe_sequence(number)):
                    # pydicom would search for a delimiter and read all before it, unlimited.
                    raise DatasetRefused(f"element ({tag_group:04X},{element:04X}) has an "
                                         "undefined length but is neither a sequence nor pixel "
                                         "data")
                else:
                    new_kind = _SEQUENCE
                    if depth >= max_depth:
                        raise _too_deep(max_depth)
                stack.append((kind, end, bound, imp, depth, -1))
                kind, end, pos = new_kind, -1, start
                depth += new_kind == _SEQUENCE
                continue
            value_end = start + length
            if value_end > bound:
                raise _truncated(kind) if value_end > size else _malformed(depth)
            if (vr == "SQ" or ((vr is None or vr == "UN") and length and (
                    number in _SQ_TAGS or _is_sequence(number, source, start, length,
                                                       item_bytes)))) and not until_pixels:
                if depth >= max_depth:
                    raise _too_deep(max_depth)
                stack.append((kind, end, bound, imp, depth, -1))
                kind, end, bound, depth, pos = _SEQUENCE, value_end, value_end, depth + 1, start
                continue
            if length > max_value and number not in PIXEL_TAGS:
                raise DatasetRefused(f"element ({tag_group:04X},{element:04X}) has a value of "
                                     f"{length} bytes, more than the {max_value}-byte limit")
            pos = value_end
            continue
        # In a sequence (items) or encapsulated pixel data (fragments).
        tag_group, element, length = tag_length.unpack_from(data, off)
        number = tag_group << 16 | element
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
    return Walk(top, header_end if header_end >= 0 else size, top_implicit, count, pixels)


def _maybe_sequence(number: int) -> bool:
    """Whether pydicom reads an implicit VR element of undefined length as a sequence: its
    dictionary VR (repeating groups included) is SQ, or it has none and pydicom looks for an
    item (the walk then refuses anything else)."""
    try:
        return bool(dictionary_VR(number) == "SQ")
    except KeyError:
        return True


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
    if not limit:
        return DatasetRefused("a sequence where none may be")
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


def walk_meta(source: Source) -> tuple[Walk, str | None]:
    """The walk of a Part 10 file's preamble and file meta (group 0002: explicit VR little
    endian, unless its first element says otherwise, as pydicom reads it), whose
    ``header_end`` is where the data set starts; and the transfer syntax (None if absent).
    HeaderError when it is not Part 10 or is cut short; DatasetRefused when it holds a
    sequence or a value over 64 KiB."""
    data, base = source.window(0, 132)
    if source.size < 132 or data[128 - base:132 - base] != b"DICM":
        raise HeaderError("not a DICOM Part 10 dataset: InvalidDicomError")
    try:
        meta = walk(source, 132, False, True, _META_LIMITS, group=2)
    except DatasetRefused as exc:
        raise DatasetRefused(f"file meta information: {exc}") from None
    for number, _, length, start, _ in meta.top:
        if number == TRANSFER_SYNTAX:
            value, value_base = source.window(start, length)
            raw = bytes(value[start - value_base:start - value_base + length])
            return meta, raw.decode("ascii", "replace").rstrip("\0 ")
    return meta, None


def syntax_encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax, as pydicom reads it (an unknown one
    as explicit VR little endian); DatasetRefused for deflate, which would be inflated
    without bound before anything could be checked."""
    if syntax in DEFLATE_SYNTAXES:
        raise DatasetRefused("deflated transfer syntax: not accepted")
    if syntax == _IMPLICIT_LE:
        return True, True
    return False, syntax != _EXPLICIT_BE


def _guessed_encoding(source: Source, pos: int) -> tuple[bool, bool]:
    """pydicom's guess for a file meta without a transfer syntax (its issue 258): explicit VR
    if the first element has a known VR, big endian if its group then reads as 1024 or more
    (the walk then switches to implicit VR if the VR bytes are no letters, as pydicom does)."""
    data, base = source.window(pos, 6)
    head = bytes(data[pos - base:pos - base + 6])
    if len(head) < 6 or head[4:6].decode("latin-1") not in VR_NAMES:
        return True, True
    return False, struct.unpack_from("<H", head)[0] < 1024


def _dataset(source: Source) -> tuple[int, bool, bool]:
    """Where the data set starts, and its encoding (implicit VR, little endian) as pydicom
    reads it: from the transfer syntax, or guessed when the file meta has none."""
    meta, syntax = walk_meta(source)
    pos = meta.header_end
    if syntax is None:
        return pos, *_guessed_encoding(source, pos)
    return pos, *syntax_encoding(syntax)


def check_source(source: Source, limits: DatasetLimits) -> Walk:
    """Walk a whole Part 10 file (file meta, then the dataset) before pydicom reads it."""
    pos, implicit, little = _dataset(source)
    return walk(source, pos, implicit, little, limits)


def check_file(fp: BinaryIO, limits: DatasetLimits) -> Walk:
    """:func:`check_source` over an open file."""
    return check_source(FileSource(fp), limits)


def locate_pixels(source: Source, resume: tuple[int, bool, bool] | None = None) -> Walk:
    """Walk a stored Part 10 file up to its top-level pixel data element (``pixels``), where
    pydicom's reader stops before pixels. ``resume`` is where that reader stopped and the
    encoding it read the dataset in (implicit VR, little endian): one element is read there.
    Without it, the walk starts at the data set, skipping over sequences of defined length.
    No limits: the object was received."""
    if resume is None:
        pos, implicit, little = _dataset(source)
        return walk(source, pos, implicit, little, UNLIMITED, until_pixels=True)
    pos, implicit, little = resume
    return walk(source, pos, implicit, little, UNLIMITED, until_pixels=True, resume=True)
