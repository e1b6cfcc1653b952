"""The instance page's tag rows (web/tag_tree.py) from real files (pydicom's bundled ones and
hostile variants): sequences nested with their items, private tags and bulk data elided
without being shown, long values cut, unreadable values reported, never a crash.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from web import tag_tree
from web.tag_tree import read_tags


def rows_by_tag(path: Path | str) -> dict[str, list[tag_tree.TagRow]]:
    table = read_tags(Path(path))
    found: dict[str, list[tag_tree.TagRow]] = {}
    for row in table.rows:
        found.setdefault(row.tag, []).append(row)
    return found


def test_ct_shows_named_tags_and_elides_private_tags_and_pixel_data() -> None:
    rows = rows_by_tag(get_testdata_file("CT_small.dcm", download=False))
    name = rows["(0010,0010)"][0]
    assert (name.name, name.vr, name.value) == ("Patient's Name", "PN", "CompressedSamples^CT1")
    assert rows["(0002,0010)"][0].value == "1.2.840.10008.1.2.1"  # the file meta too
    private = rows["(0009,0010)"][0]
    assert private.value == "" and private.note == "private tag: value not shown"
    assert "GEMS" not in " ".join(r.value for rs in rows.values() for r in rs)
    pixels = rows["(7FE0,0010)"][0]
    assert pixels.value == "" and pixels.note == "pixel data: 32768 bytes, not shown"


def test_sequences_are_nested_with_their_items() -> None:
    table = read_tags(Path(get_testdata_file("rtplan.dcm", download=False)))
    beams = next(i for i, r in enumerate(table.rows) if r.tag == "(300A,00B0)")
    assert table.rows[beams].vr == "SQ" and table.rows[beams].value == "1 item(s)"
    item = table.rows[beams + 1]
    assert (item.depth, item.name, item.tag) == (1, "Item 1", "")
    assert table.rows[beams + 2].depth == 2
    leaves = [r for r in table.rows if r.tag == "(300A,011C)"]  # four levels down
    assert leaves and all(r.depth == 6 for r in leaves)
    assert leaves[0].value == "-100.00000000000\\100.000000000000"


def test_bulk_values_long_text_and_hostile_strings(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.add_new(0x00420011, "OB", b"%PDF" + b"\x00" * 5000)  # Encapsulated Document
    ds.add_new(0x00189701, "OB", b"\x01\x02")  # a short binary value is shown
    ds.ImageComments = "x" * 2000
    ds.StudyDescription = "<script>alert(1)</script>"
    item = Dataset()
    item.add_new(0x00290010, "LO", "SECRET CREATOR")
    item.CodeValue = "../../etc/passwd"
    ds.ProcedureCodeSequence = Sequence([item])
    path = tmp_path / "bulk.dcm"
    ds.save_as(path)
    rows = rows_by_tag(path)
    assert rows["(0042,0011)"][0].note == "bulk data: 5004 bytes, not shown"
    assert rows["(0018,9701)"][0].value == "01 02"
    comments = rows["(0020,4000)"][0]
    assert len(comments.value) == tag_tree.MAX_TEXT and "2000 characters" in comments.note
    assert rows["(0008,1030)"][0].value == "<script>alert(1)</script>"  # escaped by the page
    assert rows["(0008,0100)"][0].value == "../../etc/passwd" and rows["(0008,0100)"][0].depth == 2
    assert rows["(0029,0010)"][0].note == "private tag: value not shown"


def test_sequences_deeper_than_the_limit_are_not_shown(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    inner = Dataset()
    inner.CodeValue = "deep"
    for _ in range(20):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    path = tmp_path / "deep.dcm"
    ds.save_as(path)
    table = read_tags(path)
    sequences = [r.depth for r in table.rows if r.tag == "(0040,A730)"]
    assert len(sequences) == tag_tree.MAX_DEPTH + 1  # the eleventh is named, not opened
    assert [r.depth for r in table.rows if "nested deeper than" in r.note] == [
        2 * tag_tree.MAX_DEPTH + 1] and max(r.depth for r in table.rows) == 21
    assert not any(r.value == "deep" for r in table.rows)


def test_a_big_header_is_cut_short(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    items = []
    for number in range(tag_tree.MAX_ROWS):
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"1.2.3.{number}"
        items.append(item)
    ds.ReferencedImageSequence = Sequence(items)
    path = tmp_path / "big.dcm"
    ds.save_as(path)
    table = read_tags(path)
    assert table.truncated and len(table.rows) == tag_tree.MAX_ROWS
