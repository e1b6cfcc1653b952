"""WADO-RS metadata from stored header data: one DICOM JSON entry per stored object.

Each entry is the instance's full DICOM JSON (every attribute, sequences included) with large
binary values (OB/OD/OF/OL/OV/OW/UN over 4 KB, and always the pixel data) left out as
``BulkDataURI`` references relative to the instance (``bulkdata/7FE00010``, or
``bulkdata/00880200/0/7FE00010`` inside a sequence item). Entries live under
``<data_dir>/cache/dicomweb-metadata-v1/ab/cd/<sha256>.json``, keyed by the stored object's
SHA-256: content-addressed, so an entry never goes stale. An entry is built the first time the
metadata of its instance is asked for (header read only, pixel data never loaded) and read from
disk afterwards, so the metadata of a 500-instance series is 500 small file reads, not 500
DICOM parses. The cache is derived data: delete the directory at any time and entries are
rebuilt on demand; a new format gets a new directory name.

At answer time the relative references become paths from the client's DICOMweb root: a byte
replacement after each ``"BulkDataURI":"`` (which can only be that key: quotes inside JSON
strings are escaped), so entries are never parsed again.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import orjson
from pydicom.dataset import Dataset

from router.storage.blobs import check_sha256
from web.dicomweb.stored import StoredInstance, little_endian, open_instance

logger = logging.getLogger(__name__)

CACHE_DIR = Path("cache") / "dicomweb-metadata-v1"
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 4096  # bytes: larger binary values are left to the bulkdata resource
_KEY = b'"BulkDataURI":"'


def dataset_json(ds: Dataset, prefix: str = "") -> dict[str, Any]:
    """DICOM JSON of ``ds`` with bulk data references under ``bulkdata/<prefix>``."""
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.element == 0 or tag.group == 2:  # group lengths; file meta is not metadata
            continue
        key = f"{tag:08X}"
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                items = [dataset_json(item, f"{prefix}{key}/{i}/")
                         for i, item in enumerate(elem.value)]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            elif (elem.VR in BULK_VRS and not elem.is_empty
                  and len(elem.value) > BULK_THRESHOLD):
                out[key] = {"vr": elem.VR, "BulkDataURI": f"bulkdata/{prefix}{key}"}
            else:
                out[key] = elem.to_json_dict(None, BULK_THRESHOLD)
        except Exception as exc:  # one unreadable value must not hide the others
            logger.info("metadata: element %s left out (%s)", key, type(exc).__name__)
    return out


def instance_json(inst: StoredInstance) -> dict[str, Any]:
    """The metadata of a stored instance (its transfer syntax as AvailableTransferSyntaxUID)."""
    out = dataset_json(little_endian(inst.header))  # inline binary values are little endian
    out["00083002"] = {"vr": "UI", "Value": [str(inst.transfer_syntax)]}
    if inst.pixels is not None:
        key = f"{inst.pixels.tag:08X}"
        vr = "OB" if inst.encapsulated else inst.pixels.vr
        out[key] = {"vr": vr, "BulkDataURI": f"bulkdata/{key}"}
    return dict(sorted(out.items()))


class MetadataCache:
    """Per-object DICOM JSON entries under the data directory (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / CACHE_DIR

    def entry_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.json"

    def entry(self, sha256: str, blob: Path | None) -> bytes | None:
        """The entry of one stored object, built from ``blob`` if missing; None when it is
        neither cached nor stored (or cannot be parsed).
        """
        path = self.entry_path(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        if blob is None:
            return None
        try:
            data = orjson.dumps(instance_json(open_instance(blob)))
        except Exception as exc:  # a stored object pydicom cannot read: no metadata for it
            logger.warning("metadata of blob %s… could not be built: %s", sha256[:12],
                           type(exc).__name__)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        temp.write_bytes(data)
        os.replace(temp, path)  # readers see the whole entry or none
        return data


def with_base(entry: bytes, instance_path: str) -> bytes:
    """An entry with its bulk data references made absolute paths (``instance_path`` is
    percent-encoded ASCII, so it needs no JSON escaping).
    """
    return entry.replace(_KEY, _KEY + instance_path.encode("ascii") + b"/")
