"""Reading a stored object's header (never its pixel data) and the index attributes taken from it.

The index is what the studies view, C-FIND and QIDO need; it is stored in the (encrypted) receipt
event so that the views can be rebuilt from the log alone.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
    "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
    "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "BitsAllocated", "AcquisitionDateTime",
)


class HeaderError(ValueError):
    """The object is not a DICOM dataset we can parse (the message carries no PHI)."""


def read_header(path: Path, *, check: bool = True) -> Dataset:
    """The dataset without pixel data; HeaderError if it is not parseable DICOM or truncated.

    ``check`` walks every element header to the end of the file (cheap: values are not read
    or converted); objects already accepted into the blob store are read with check=False.
    """
    try:
        with path.open("rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
            if check:
                _check_complete(ds, fp)
        # Touch an element so that a garbled dataset fails here, not later.
        _ = ds.get("SOPInstanceUID")
    except HeaderError:
        raise
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM Part 10 dataset: {type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises many types (BytesLengthException, struct.error..)
        raise HeaderError(f"dataset could not be parsed: {type(exc).__name__}") from None
    return ds


_UNDEFINED = 0xFFFFFFFF
# Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"))
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def _check_complete(ds: Dataset, fp: BinaryIO) -> None:
    """HeaderError if the file ends before its elements do (pydicom reads short values silently).

    Checks the elements read so far, then walks the element headers from the pixel data to the
    end of the file, seeking over values (the pixel data is never read).
    """
    size = os.fstat(fp.fileno()).st_size
    last_end = None
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself would decode every value
        raw = ds.get_item(tag)
        last_end = None
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED:
            if raw.value is not None and len(raw.value) != raw.length:
                raise HeaderError("dataset is truncated")
            last_end = raw.value_tell + raw.length
    if fp.tell() >= size:
        if last_end is not None and last_end != size:  # a cut inside an element header
            raise HeaderError("dataset is truncated")
        return
    implicit, little = ds.original_encoding
    check_rest(fp, size, bool(implicit), ">" if little is False else "<")


def check_rest(fp: BinaryIO, size: int, implicit: bool, order: str) -> None:
    """HeaderError unless the element headers from ``fp``'s position lead to the file's end
    (values are seeked over, never read)."""
    while fp.tell() < size:
        group, element, length = _element_header(fp, implicit, order)
        if length != _UNDEFINED:
            if fp.tell() + length > size:
                raise HeaderError("dataset is truncated")
            fp.seek(length, os.SEEK_CUR)
        elif (group, element) == (0x7FE0, 0x0010):
            _skip_fragments(fp, size)
        else:
            return  # an undefined-length sequence after the pixel data: not walked


def _element_header(fp: BinaryIO, implicit: bool, order: str) -> tuple[int, int, int]:
    head = fp.read(8)
    if len(head) < 8:
        raise HeaderError("dataset is truncated")
    group, element = struct.unpack(order + "HH", head[:4])
    if implicit:
        return group, element, struct.unpack(order + "L", head[4:])[0]
    if head[4:6] in LONG_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            raise HeaderError("dataset is truncated")
        return group, element, struct.unpack(order + "L", extra)[0]
    return group, element, struct.unpack(order + "H", head[6:])[0]


def _skip_fragments(fp: BinaryIO, size: int) -> None:
    """Encapsulated pixel data: walk the item headers up to the sequence delimiter."""
    while True:
        item = fp.read(8)
        if len(item) < 8:
            raise HeaderError("pixel data is truncated")
        group, element, length = struct.unpack("<HHL", item)
        if (group, element) == _SEQUENCE_END:
            return
        if (group, element) != _ITEM or fp.tell() + length > size:
            raise HeaderError("pixel data is truncated or malformed")
        fp.seek(length, os.SEEK_CUR)


def _json_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bytes):
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return [_json_value(v) for v in value]
    if isinstance(value, int | float | str):
        return value if not isinstance(value, bool) else int(value)
    return str(value)


def index_attributes(ds: Dataset) -> dict[str, Any]:
    """JSON-safe values of :data:`INDEX_KEYWORDS` present in ``ds`` (empty ones omitted)."""
    index: dict[str, Any] = {}
    for keyword in INDEX_KEYWORDS:
        value = index_value(ds, keyword)
        if value not in (None, "", []):
            index[keyword] = value
    return index


def index_value(ds: Dataset, keyword: str) -> Any:
    """The JSON-safe value of one element (None when missing or not convertible)."""
    try:
        elem = ds.data_element(keyword)
    except (KeyError, ValueError, TypeError):
        return None
    if elem is None:
        return None
    try:
        return _json_value(elem.value)
    except (ValueError, TypeError, OverflowError):
        return None
