"""The DICOM Conformance Statement's generated tables agree with the code: regenerating them
changes nothing; a table edited by hand, or a marker lost, is caught."""

from __future__ import annotations

import re

import pytest
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from router.dicom import conformance
from router.dicom.identity import IMPLEMENTATION_UID
from router.dicom.scp import TRANSFER_SYNTAXES


def document() -> str:
    return conformance.DOCUMENT.read_text(encoding="utf-8")


def test_document_tables_are_what_the_code_declares() -> None:
    text = document()
    assert conformance.rewrite(text) == text, "run scripts/conformance-tables"
    assert conformance.main(["--check"]) == 0


def test_a_table_edited_by_hand_is_regenerated() -> None:
    text = document()
    edited = text.replace(f"`{IMPLEMENTATION_UID}`", "`1.2.3.4`", 1)
    dropped = re.sub(r"^\| CT Image Storage \|.*\n", "", text, count=1, flags=re.M)
    assert edited != text and dropped != text
    assert conformance.rewrite(edited) == text
    assert conformance.rewrite(dropped) == text


def test_a_lost_marker_is_an_error_naming_the_table() -> None:
    text = document().replace("<!-- end generated: identity -->", "", 1)
    with pytest.raises(ValueError, match="identity"):
        conformance.rewrite(text)


def test_storage_table_lists_every_class_and_syntax_the_port_accepts() -> None:
    text = document()
    for uid in _STORAGE_CLASSES.values():
        assert f"`{uid}` | SCP, SCU |" in text
    assert f"{len(_STORAGE_CLASSES)} storage SOP classes." in text
    for syntax in TRANSFER_SYNTAXES:
        assert f"| `{syntax}` |" in text


def test_prose_cites_the_standard_not_source_files() -> None:
    assert not re.search(r"(?<![\w-])(router|projections|web)/\w+|\w\.py\b", document())
