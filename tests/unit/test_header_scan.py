"""The fast header reader of the receive path against pydicom's reader: the same index, the
same elements and values, the same errors, on files from other producers (pydicom's test
files); on damaged copies of them the same, or refused where pydicom's reader reads on (the
walk of router.dicom.limits is stricter than pydicom about truncated sequences)."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom.data import get_testdata_file

from router.dicom import header_scan
from router.dicom.header import HeaderError, index_attributes, read_header
from router.dicom.header_scan import scan_header
from router.dicom.limits import DatasetRefused


def _local_test_files() -> list[Path]:
    """pydicom's bundled files and pydicom-data's (listed directly: pydicom's own lister tries
    to download what is missing, which takes 15 s offline)."""
    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return sorted(
        path for root in roots for path in root.glob("*")
        if path.is_file() and path.suffix.lower() not in (".json", ".py", ".txt", ".gz", ".bz2")
    )


FILES = _local_test_files()


def _value(dataset: Any, tag: Any) -> Any:
    try:
        return dataset[tag].value
    except Exception as exc:  # the same failure is the same answer
        return type(exc)


def _outcome(path: Path, reader: str) -> tuple[str, Any, Any]:
    try:
        if reader == "pydicom":
            dataset = read_header(path)
            return "ok", index_attributes(dataset), dataset
        scanned = scan_header(path)
        return "ok", scanned.index, scanned.dataset
    except HeaderError as exc:
        return "error", str(exc), None


def _assert_same(path: Path, damaged: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values these files hold
        old, new = _outcome(path, "pydicom"), _outcome(path, "scan")
        if damaged and new[0] == "error":
            return  # refused, whatever pydicom's reader makes of it: never read and acknowledged
        assert new[:2] == old[:2]
        if old[0] == "ok":
            assert set(new[2].keys()) == set(old[2].keys())
            for tag in old[2].keys():  # noqa: SIM118 - keys, not converted elements
                assert _value(new[2], tag) == _value(old[2], tag), tag
            assert set(new[2].file_meta.keys()) == set(old[2].file_meta.keys())


def test_the_file_set_is_large_enough_to_mean_something() -> None:
    assert len(FILES) > 100


DEFLATED = {"image_dfl.dcm"}


@pytest.mark.parametrize("path", [p for p in FILES if p.name not in DEFLATED],
                         ids=lambda p: p.name)
def test_same_as_pydicom_for_files_from_other_producers(path: Path) -> None:
    _assert_same(path)


def test_same_as_pydicom_for_damaged_files(tmp_path: Path) -> None:
    rnd = random.Random(7)
    for source in FILES[::4]:
        data = source.read_bytes()
        for cut in {rnd.randrange(len(data)) for _ in range(4)} | {len(data) - 1}:
            damaged = tmp_path / "damaged.dcm"
            damaged.write_bytes(data[:cut])
            _assert_same(damaged, damaged=True)
            flipped = bytearray(data)
            flipped[cut] ^= 0xFF
            damaged.write_bytes(bytes(flipped))
            _assert_same(damaged, damaged=True)


def _without_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("fell back to pydicom's reader")

    monkeypatch.setattr(header_scan, "read_header", refuse)


@pytest.mark.parametrize("name", [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "JPEG2000.dcm",  # encapsulated pixel data: the fragments are walked, not read
    "rtplan.dcm",  # nested undefined-length sequences
])
def test_common_files_are_read_without_pydicoms_reader(name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(get_testdata_file(name))
    expected = index_attributes(read_header(path))
    _without_fallback(monkeypatch)
    assert scan_header(path).index == expected


def test_truncated_pixel_data_is_refused_like_pydicom(tmp_path: Path) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    with pytest.raises(HeaderError, match="truncated"):
        scan_header(cut)


def test_deflate_is_refused_before_anything_inflates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_fallback(monkeypatch)
    with pytest.raises(DatasetRefused, match="deflated"):
        scan_header(Path(get_testdata_file("image_dfl.dcm")))


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "JPEG2000.dcm"])
def test_reading_through_the_spools_descriptor_gives_the_same(name: str) -> None:
    from router.dicom.spool import PositionalReader

    path = Path(get_testdata_file(name))
    with path.open("rb") as fp:
        reader = PositionalReader(fp.fileno())
        reader.seek(100)  # wherever it was left: the scan starts at 0
        assert scan_header(path, reader).index == scan_header(path).index
