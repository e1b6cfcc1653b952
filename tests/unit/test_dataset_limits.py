"""The dataset limits walk (router.dicom.limits): what real objects hold passes, what is beyond a
limit is refused with the limit as the reason, and pydicom reads safely whatever passes."""

from __future__ import annotations

import struct
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from router.ai.deid import deidentify
from router.dicom.header import HeaderError, read_header
from router.dicom.header_scan import scan_header
from router.dicom.limits import DatasetLimits, DatasetRefused, check_file
from router.dicom.uids import repaired_uid, uid_problem
from router.settings import MAX_SEQUENCE_DEPTH, IngestSettings
from tests.hostile import CONTENT_SEQUENCE, element, nested, write
from tests.unit.test_header_scan import FILES

LIMITS = DatasetLimits()


def walk(path: Path, limits: DatasetLimits = LIMITS) -> int:
    with path.open("rb") as fp:
        return check_file(fp, limits).elements


def test_defaults_are_the_ingest_settings() -> None:
    assert DatasetLimits.of(IngestSettings()) == LIMITS
    assert LIMITS.max_depth <= MAX_SEQUENCE_DEPTH


def test_every_file_pydicom_reads_is_within_the_default_limits() -> None:
    walked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in FILES:
            try:
                read_header(path)
            except HeaderError:
                continue
            try:
                walk(path)
            except DatasetRefused as exc:
                assert "deflated" in str(exc), f"{path.name}: {exc}"
                continue
            walked += 1
    assert walked > 100


@pytest.mark.parametrize("defined", [False, True], ids=["undefined", "defined"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_nesting_up_to_the_limit_passes_one_more_is_refused(tmp_path: Path, defined: bool,
                                                            implicit: bool) -> None:
    limits = DatasetLimits(max_depth=8)
    path = tmp_path / "nested.dcm"
    write(path, nested(8, defined, implicit), implicit=implicit)
    walk(path, limits)
    scan_header(path, limits=limits)
    write(path, nested(9, defined, implicit), implicit=implicit)
    with pytest.raises(DatasetRefused, match="nested deeper than 8 levels"):
        walk(path, limits)
    with pytest.raises(DatasetRefused, match="nested deeper than 8 levels"):
        scan_header(path, limits=limits)


@pytest.mark.parametrize("defined", [False, True], ids=["undefined", "defined"])
def test_sequences_pydicom_would_find_in_un_and_private_values_are_walked(
        tmp_path: Path, defined: bool) -> None:
    limits = DatasetLimits(max_depth=8)
    path = tmp_path / "un.dcm"
    # A public sequence sent as UN (pydicom reads it as a sequence), and a private one in an
    # implicit VR dataset (pydicom's private dictionary knows many).
    write(path, nested(9, defined, vr="UN"))
    with pytest.raises(DatasetRefused, match="nested deeper"):
        walk(path, limits)
    private = element((0x0029, 0x0010), "LO", b"SIEMENS CSA HEADER", implicit=True)
    write(path, private + nested(9, defined, implicit=True, tag=(0x0029, 0x1020)),
          implicit=True)
    with pytest.raises(DatasetRefused, match="nested deeper"):
        walk(path, limits)


def test_sequences_after_the_pixel_data_are_walked(tmp_path: Path) -> None:
    pixels = element((0x7FE0, 0x0010), "OB", b"\0" * 64)
    path = tmp_path / "after.dcm"
    write(path, pixels + nested(9, tag=(0xFFFA, 0xFFFA)))  # Digital Signatures Sequence
    with pytest.raises(DatasetRefused, match="nested deeper"):
        walk(path, DatasetLimits(max_depth=8))


def test_the_walk_is_not_recursive(tmp_path: Path) -> None:
    path = tmp_path / "deep.dcm"
    write(path, nested(20_000))
    assert walk(path, DatasetLimits(max_depth=10**6)) > 40_000
    with pytest.raises(DatasetRefused, match="nested deeper than 64"):
        scan_header(path)


def test_element_count(tmp_path: Path) -> None:
    many = b"".join(element((0x0009, 0x1000 + i), "LO", b"AB") for i in range(3000))
    path = tmp_path / "many.dcm"
    write(path, many)
    elements = walk(path)
    with pytest.raises(DatasetRefused, match=f"more than {elements - 1} data elements"):
        walk(path, DatasetLimits(max_elements=elements - 1))
    # Fragments count too: a pixel data of 5000 empty fragments.
    fragments = (struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<L", 0xFFFFFFFF)
                 + struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 5000
                 + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    write(path, fragments)
    with pytest.raises(DatasetRefused, match="more than 1000 data elements"):
        walk(path, DatasetLimits(max_elements=1000))


def test_value_length_spares_pixel_data(tmp_path: Path) -> None:
    limits = DatasetLimits(max_value_length=1 << 16)
    path = tmp_path / "big.dcm"
    write(path, element((0x0042, 0x0011), "OB", b"%PDF" + b"\0" * (1 << 16)))
    with pytest.raises(DatasetRefused, match=r"element \(0042,0011\) has a value of 65540 bytes"):
        walk(path, limits)
    write(path, element((0x7FE0, 0x0010), "OB", b"\0" * (1 << 17)))
    walk(path, limits)


@pytest.mark.parametrize("body", [
    # An item longer than its sequence.
    struct.pack("<HH", *CONTENT_SEQUENCE) + b"SQ\0\0" + struct.pack("<L", 8)
    + struct.pack("<HHL", 0xFFFE, 0xE000, 16) + b"\0" * 16,
    # A sequence holding something that is not an item.
    struct.pack("<HH", *CONTENT_SEQUENCE) + b"SQ\0\0" + struct.pack("<L", 0xFFFFFFFF)
    + element((0x0010, 0x0010), "PN", b"AB") + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
    # An item delimiter at the top level.
    struct.pack("<HHL", 0xFFFE, 0xE00D, 0),
], ids=["item-too-long", "not-an-item", "stray-delimiter"])
def test_sequences_that_do_not_nest_are_refused(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "bad.dcm"
    write(path, body)
    with pytest.raises(DatasetRefused, match="malformed"):
        scan_header(path)


def test_an_undefined_length_value_must_be_a_sequence_or_pixel_data(tmp_path: Path) -> None:
    """pydicom reads any other one up to the next delimiter bytes: unbounded by any limit."""
    blob = (struct.pack("<HH", 0x0042, 0x0011) + b"OB\0\0" + struct.pack("<L", 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"%PDF"
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / "undefined.dcm"
    write(path, blob)
    with pytest.raises(DatasetRefused, match=r"\(0042,0011\) has an undefined length"):
        scan_header(path)


def _in_a_deep_thread(work: Callable[[], Any], frames: int = 150) -> None:
    """Run ``work`` in a thread with ``frames`` already on its stack (a delivery worker's or a
    web handler's call chain), re-raising what it raised."""
    failure: list[BaseException] = []

    def descend(n: int) -> None:
        if n:
            descend(n - 1)
        else:
            try:
                work()
            except BaseException as exc:
                failure.append(exc)

    thread = threading.Thread(target=descend, args=(frames,))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


@pytest.mark.parametrize("defined", [False, True], ids=["undefined", "defined"])
def test_pydicom_and_the_delivery_path_read_the_deepest_dataset_allowed(
        tmp_path: Path, defined: bool) -> None:
    """At the ceiling of [ingest] max_sequence_depth: pydicom's reader, element iteration,
    JSON (DICOMweb metadata), its writer and de-identification, all recursive."""
    assert sys.getrecursionlimit() == 1000
    path = tmp_path / "ceiling.dcm"
    write(path, nested(MAX_SEQUENCE_DEPTH, defined,
                       leaf=element((0x0010, 0x0020), "LO", b"LEAF")))
    walk(path, DatasetLimits(max_depth=MAX_SEQUENCE_DEPTH))

    def everything() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            assert sum(1 for _ in ds.iterall()) > MAX_SEQUENCE_DEPTH
            for elem in ds:
                elem.to_json_dict(None, 1024)
            ds.save_as(tmp_path / "copy.dcm", enforce_file_format=True)
            deidentify(path, "seed", {})

    _in_a_deep_thread(everything)


@pytest.mark.parametrize(("value", "problem"), [
    ("1.2.840.10008.5.1.4.1.1.2", None),
    ("1.2.04.5", None),  # a leading zero: invalid, harmless, common; accepted
    ("0", None),
    ("../x", "is not digits and dots with no empty component"),
    ("/etc", "is not digits and dots with no empty component"),
    ("1..2", "is not digits and dots with no empty component"),
    (".1.2", "is not digits and dots with no empty component"),
    ("1.2.", "is not digits and dots with no empty component"),
    ("1.2 3", "is not digits and dots with no empty component"),
    ("1." + "2" * 63, "is longer than 64 characters"),
    ("", "is empty"),
    (["1.2", "1.3"], "is not a single UID"),
])
def test_uid_rules(value: object, problem: str | None) -> None:
    assert uid_problem(value) == problem


def test_a_repaired_uid_is_valid_and_the_same_for_the_same_original() -> None:
    first, again, other = repaired_uid("../x"), repaired_uid("../x"), repaired_uid("/etc")
    assert first == again != other
    assert uid_problem(first) is None and first.startswith("2.25.")
