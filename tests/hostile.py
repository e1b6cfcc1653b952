"""Hostile datasets made byte by byte: nesting, lengths, counts and UIDs no modality writes.

pydicom cannot write most of these (its writer recurses as its reader does), so the bytes
are put together here: a small valid dataset (``identity``) followed by whatever is tested.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CONTENT_SEQUENCE = (0x0040, 0xA730)
UNDEFINED = 0xFFFFFFFF


def identity(sop_class: str = CT_IMAGE, sop_instance: str | None = None,
             **values: str) -> Dataset:
    """A dataset with the identity the router needs, and ``values`` by keyword."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HOSTILE1"
    ds.PatientName = "Hostile^Test"
    ds.Modality = "OT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def element(tag: tuple[int, int], vr: str, value: bytes, implicit: bool = False) -> bytes:
    """One element, little endian (``value`` as given: no padding is added)."""
    head = struct.pack("<HH", *tag)
    if implicit:
        return head + struct.pack("<L", len(value)) + value
    if vr.encode() in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"):
        return head + vr.encode() + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def nested(depth: int, defined: bool = False, implicit: bool = False, vr: str = "SQ",
           tag: tuple[int, int] = CONTENT_SEQUENCE, leaf: bytes = b"") -> bytes:
    """``tag`` holding one item holding ``tag``... ``depth`` sequences deep (``leaf`` in the
    innermost item), with defined or undefined lengths."""
    head = struct.pack("<HH", *tag)

    def sequence(length: int) -> bytes:
        if implicit:
            return head + struct.pack("<L", length)
        return head + vr.encode() + b"\0\0" + struct.pack("<L", length)

    inner = leaf
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = sequence(len(item)) + item
        else:
            item = (struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + inner
                    + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
            inner = sequence(UNDEFINED) + item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return inner


def part10(body: bytes, ds: Dataset, implicit: bool = False) -> bytes:
    """Preamble, file meta for ``ds``'s identity, ``ds`` encoded, then ``body`` (elements whose
    tags follow ``ds``'s, so the dataset stays in tag order)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    encoded = encode(ds, implicit, True)
    assert encoded is not None
    return b"\0" * 128 + b"DICM" + fp.getvalue() + bytes(encoded) + body


def write(path: Path, body: bytes, ds: Dataset | None = None, implicit: bool = False) -> str:
    """Write a Part 10 file; returns its SOP Instance UID."""
    ds = ds or identity()
    path.write_bytes(part10(body, ds, implicit))
    return str(ds.SOPInstanceUID)
