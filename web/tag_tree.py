"""The tags of a stored instance as rows for the instance page: name, tag, VR and value, with
sequences nested. Private tags and bulk data (pixel data, long OB/OW/UN/... values) are
elided with a note, never read: the file is opened with deferred reading and those values are
looked at only through their raw header (tag, VR, length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_description
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from router.dicom.limits import PIXEL_TAGS

BULK_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
BULK_BYTES = 256  # a binary value longer than this is bulk data: its size is shown instead
DEFER_BYTES = 4096  # values longer than this stay on disk until asked for
MAX_TEXT = 512  # characters of one value shown; longer ones are cut with a note
MAX_DEPTH = 10  # nested sequence levels shown (a row's depth is two per level: item, element)
MAX_ROWS = 5000  # rows in all; a bigger header says it was cut short


@dataclass
class TagRow:
    """One element (or one sequence item, ``vr == ""``) at a nesting depth."""

    depth: int
    tag: str
    name: str
    vr: str
    value: str = ""
    note: str = ""


@dataclass
class TagTable:
    rows: list[TagRow] = field(default_factory=list)
    truncated: bool = False

    def add(self, row: TagRow) -> bool:
        if len(self.rows) >= MAX_ROWS:
            self.truncated = True
            return False
        self.rows.append(row)
        return True


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shown(value: Any) -> tuple[str, str]:
    """A value as text (multi-values joined with backslashes), and a note if cut."""
    if isinstance(value, bytes):
        text = value.hex(" ")
    elif isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = "" if value is None else str(value)
    if len(text) > MAX_TEXT:
        return text[:MAX_TEXT], f"{len(text)} characters, first {MAX_TEXT} shown"
    return text, ""


def _elided(tag: int, vr: str, length: int) -> str:
    """Why a value is not shown, or "" when it is."""
    if Tag(tag).is_private:
        return "private tag: value not shown"
    if tag in PIXEL_TAGS:
        return "pixel data: not shown" if length == 0xFFFFFFFF else \
            f"pixel data: {length} bytes, not shown"
    if vr in BULK_VRS and length > BULK_BYTES:
        return "bulk data: " + ("undefined length" if length == 0xFFFFFFFF
                                else f"{length} bytes") + ", not shown"
    return ""


def _walk(ds: Dataset, depth: int, table: TagTable) -> None:
    for tag in ds.keys():  # noqa: SIM118 - keys, not converted elements
        raw = ds.get_item(tag)
        vr = str(raw.VR or "") if raw is not None else ""
        length = _length(raw)
        name = dictionary_description(tag) if _known(tag) else "(unknown tag)"
        note = _elided(int(tag), vr, length)
        if note:
            if not table.add(TagRow(depth, tag_text(tag), name, vr, "", note)):
                return
            continue
        if not _element(ds, int(tag), depth, name, table):
            return


def _length(raw: Any) -> int:
    """A value's length in bytes, from its raw header when pydicom has not read it yet."""
    if isinstance(raw, RawDataElement):
        return int(raw.length)
    value = getattr(raw, "value", None)
    return len(value) if isinstance(value, bytes | bytearray) else 0


def _known(tag: int) -> bool:
    try:
        dictionary_description(tag)
        return True
    except KeyError:
        return False


def _element(ds: Dataset, tag: int, depth: int, name: str, table: TagTable) -> bool:
    try:
        elem = ds[tag]
    except Exception:  # a value pydicom cannot convert: shown as unreadable, the page lives
        return table.add(TagRow(depth, tag_text(tag), name, "", "", "value could not be read"))
    if elem.VR != "SQ":
        if elem.VR in BULK_VRS and isinstance(elem.value, bytes) \
                and len(elem.value) > BULK_BYTES:
            return table.add(TagRow(depth, tag_text(tag), name, elem.VR, "",
                                    f"bulk data: {len(elem.value)} bytes, not shown"))
        text, note = _shown(elem.value)
        return table.add(TagRow(depth, tag_text(tag), name, elem.VR, text, note))
    items = list(elem.value)
    if not table.add(TagRow(depth, tag_text(tag), name, "SQ", f"{len(items)} item(s)")):
        return False
    if depth // 2 + 1 > MAX_DEPTH:
        return table.add(TagRow(depth + 1, "", "", "", "",
                                f"nested deeper than {MAX_DEPTH} levels: not shown"))
    for number, item in enumerate(items, 1):
        if not table.add(TagRow(depth + 1, "", f"Item {number}", "")):
            return False
        _walk(item, depth + 2, table)
        if table.truncated:
            return False
    return True


def read_tags(path: Path) -> TagTable:
    """The file meta and data set of a stored file as rows (synchronous: run in a thread)."""
    ds = dcmread(path, defer_size=DEFER_BYTES)
    table = TagTable()
    _walk(ds.file_meta, 0, table)
    _walk(ds, 0, table)
    return table
