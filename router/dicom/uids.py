"""Checking the UIDs a received object is filed and served under, and repairing them.

PS3.5 9.1: a UID is components of digits separated by dots, at most 64 characters, and a
component of more than one digit does not start with 0. The identity UIDs of a received object
name its blob's place in the studies index, file and S3 paths and DICOMweb URLs, so one that is
not digits and dots (``../x``, ``/etc``), has an empty component or is longer than 64 is
refused. Leading zeros in a component are invalid too, but harmless and common from older
devices: they are accepted.

A site whose senders send such UIDs anyway may have them repaired (``[ingest] invalid_uids =
"repair"``): the SOP Instance, Study and Series UIDs become ``2.25.<n>`` where ``n`` is a
name-based UUID (version 5) of the original, so every object of a series keeps one series UID
and a resend gets the same UID again. The SOP Class UID and the transfer syntax are never
repaired: they say what the object is and how it is encoded.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

import pydicom
from pydicom.uid import UID

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
REPAIR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "dicom-router/repaired-uid")
# Index keywords of the UIDs that may be repaired (they only name the object).
REPAIRABLE = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def uid_problem(value: object) -> str | None:
    """Why ``value`` is not a UID the router files objects under (no PHI), or None."""
    if not isinstance(value, str):
        return "is not a single UID"
    if not value:
        return "is empty"
    if len(value) > MAX_UID_LENGTH:
        return f"is longer than {MAX_UID_LENGTH} characters"
    if not _UID.fullmatch(value):
        return "is not digits and dots with no empty component"
    return None


def repaired_uid(original: object) -> str:
    """The ``2.25`` UID that replaces an invalid one (the same for the same original)."""
    if isinstance(original, list | tuple):
        original = "\\".join(str(value) for value in original)
    return f"2.25.{uuid.uuid5(REPAIR_NAMESPACE, str(original)).int}"


def rewrite_uids(path: Path, replacements: Mapping[str, str]) -> None:
    """Rewrite the spooled object at ``path`` with ``replacements`` (keyword -> UID) in place:
    written beside it, fsynced, renamed over it. Only called once the dataset limits passed,
    so pydicom reads it safely; the other elements are written back as they were read."""
    dataset = pydicom.dcmread(path)
    for keyword, uid in replacements.items():
        setattr(dataset, keyword, uid)
    if "SOPInstanceUID" in replacements:
        dataset.file_meta.MediaStorageSOPInstanceUID = UID(replacements["SOPInstanceUID"])
    # A ".part" name: crash recovery removes it if no receipt names its content.
    temporary = path.with_name(f"{uuid.uuid4().hex}.part")
    try:
        with temporary.open("wb") as out:
            dataset.save_as(out, enforce_file_format=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
