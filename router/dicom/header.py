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

# HeaderError is the walker's; callers import it from here too.
from router.dicom.limits import UNLIMITED, HeaderError, check_file

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


def read_header(path: Path, *, check: bool = True) -> Dataset:
    """The dataset without pixel data; HeaderError if it is not parseable DICOM or truncated.

    ``check`` first walks every element header to the end of the file (router.dicom.limits:
    values are seeked over, never read; pydicom reads a value cut short by the end of the
    file without a word); objects already walked or accepted into the blob store are read
    with check=False.
    """
    try:
        with path.open("rb") as fp:
            if check:
                check_file(fp, UNLIMITED)
                fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
        # Touch an element so that a garbled dataset fails here, not later.
        _ = ds.get("SOPInstanceUID")
    except HeaderError:
        raise
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM Part 10 dataset: {type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises many types (BytesLengthException, struct.error..)
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
