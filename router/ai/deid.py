"""De-identification before an AI processor sees a study, and re-identification of what it
sends back.

dicognito applies the PS3.15 basic profile (names, IDs, UIDs, dates shifted, addresses...)
deterministically from a seed, so every instance of a unit, and every later amendment, gets the
same pseudonyms. While de-identifying we record which pseudonym replaced which original value
(keyed by VR and value, so references in sequences map too); the mapping is kept sealed with
the request and used to put the originals back into result objects.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT"})
Mapping = MutableMapping[str, str]


def _texts(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(path, VR, value) of every text value, through sequences."""
    for element in ds:
        path = f"{prefix}{element.tag:08X}"
        if element.VR == "SQ":
            for i, item in enumerate(element.value or ()):
                yield from _texts(item, f"{path}[{i}].")
        elif element.VR in TEXT_VRS and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            for j, value in enumerate(values):
                yield f"{path}#{j}", element.VR, str(value)


def deidentify(path: Path, seed: str, mapping: Mapping) -> bytes:
    """The de-identified Part 10 bytes of ``path``; ``mapping`` learns pseudonym -> original."""
    ds = pydicom.dcmread(path)
    before = {p: (vr, v) for p, vr, v in _texts(ds)}
    Anonymizer(seed=seed).anonymize(ds)
    for p, vr, value in _texts(ds):
        old = before.get(p)
        if old is not None and old[1] != value:
            mapping[f"{vr}:{value}"] = old[1]
    if "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _restore(ds: Dataset, mapping: Mapping) -> int:
    changed = 0
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                changed += _restore(item, mapping)
            continue
        if element.VR not in TEXT_VRS or element.value in (None, ""):
            continue
        values = list(element.value) if element.VM > 1 else [element.value]
        restored = [mapping.get(f"{element.VR}:{v}", v) for v in values]
        if restored != [str(v) for v in values]:
            element.value = restored if element.VM > 1 else restored[0]
            changed += 1
    return changed


def reidentify(path: Path, mapping: Mapping) -> int:
    """Put the original values back into the file at ``path`` (rewritten in place); returns
    how many elements changed."""
    ds = pydicom.dcmread(path)
    changed = _restore(ds, mapping)
    if changed:
        if "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    return changed


def pseudonyms(seed: str, uids: list[str]) -> dict[str, str]:
    """original -> pseudonym for ``uids``, exactly as :func:`deidentify` with this seed maps
    them in the files (dicognito maps UIDs by value), for the JSON that names them."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.add_new(0x00080058, "UI", list(uids))  # Failed SOP Instance UID List: any UI list
    Anonymizer(seed=seed).anonymize(ds)
    values = ds[0x00080058].value
    new = list(values) if len(uids) > 1 else [values]
    return {old: str(p) for old, p in zip(uids, new, strict=True)}
