"""Reading a stored object's header (never its pixel data) and the index attributes taken from it.

The index is what the studies view, C-FIND and QIDO need; it is stored in the (encrypted) receipt
event so that the views can be rebuilt from the log alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName",
    "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
    "SeriesDate", "SeriesTime",
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "BitsAllocated",
)


class HeaderError(ValueError):
    """The object is not a DICOM dataset we can parse (the message carries no PHI)."""


def read_header(path: Path) -> Dataset:
    """The dataset without pixel data; HeaderError if it is not parseable DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        # Touch an element so that a truncated or garbled dataset fails here, not later.
        _ = ds.get("SOPInstanceUID")
        for elem in ds:  # decode every element header before the pixel data
            _ = elem.tag
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM Part 10 dataset: {type(exc).__name__}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise HeaderError(f"dataset could not be parsed: {type(exc).__name__}") from None
    return ds


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
        try:
            elem = ds.data_element(keyword)
        except (KeyError, ValueError, TypeError):
            continue
        if elem is None:
            continue
        try:
            value = _json_value(elem.value)
        except (ValueError, TypeError, OverflowError):
            continue
        if value not in (None, "", []):
            index[keyword] = value
    return index
