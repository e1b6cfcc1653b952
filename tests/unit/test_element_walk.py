"""The element walker (router.dicom.limits) fuzzed with mutated real files: it raises nothing but
its own HeaderError (DatasetRefused), never calls itself, and agrees with pydicom's reader
wherever that reader reads the file without an error.

Agrees means, for the file meta and the top-level dataset: where the data set starts (pydicom's
position after the file meta), the top-level encoding, each top-level element before the pixel
data (tag, VR as written, value offset and length, as pydicom keeps it: the last of a repeated
tag), where pydicom stops before the pixel data, and the pixel data element's tag, value offset
and length. The walker may refuse what pydicom reads (it is stricter: a value cut short by the
end of the file, items that do not nest, a value of undefined length that is no sequence, a
sequence or a value over 64 KiB in the file meta), but only for one of those reasons. Files
whose data set starts with group 0000 elements are compared up to the file meta only: pydicom
reads those as a command set, apart from the dataset, and the walker does not.
"""

from __future__ import annotations

import re
import struct
import sys
import warnings
from collections import Counter
from io import BytesIO
from pathlib import Path
from types import FrameType
from typing import Any

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filereader import (
    _read_command_set_elements,
    _read_file_meta_info,
    data_element_generator,
    read_preamble,
)

from router.dicom import limits
from router.dicom.limits import (
    UNDEFINED,
    UNLIMITED,
    BytesSource,
    DatasetLimits,
    HeaderError,
    Walk,
    check_source,
    locate_pixels,
    walk_meta,
)
from router.dicom.store_scu import dataset_offset
from tests.hostile import identity, nested, part10
from tests.unit.test_header_scan import FILES
from web.dicomweb.stored import open_instance

EXAMPLES = 400
# Other producers' files: explicit and implicit VR, big endian, encapsulated pixel data, nested
# undefined-length sequences, an SR tree, UN and private sequences, a file meta without a
# transfer syntax; and one 300 sequences deep (a recursive walker would show it).
SEEDS = {name: Path(get_testdata_file(name)).read_bytes() for name in (
    "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
    "rtplan.dcm", "test-SR.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm",
    "meta_missing_tsyntax.dcm")}
SEEDS["nested-300"] = part10(nested(300, True, True, leaf=struct.pack("<HHL", 0x0010, 0x0020, 0)),
                             identity(), implicit=True)
# The walker's reasons for refusing what pydicom's reader reads in some lenient way.
STRICTER = re.compile(r"truncated|malformed|undefined length|file meta information: "
                      r"(a sequence|element)|deflated")
SMALL = DatasetLimits(max_depth=3, max_elements=300, max_value_length=2048)
# Bytes written over a header: lengths, delimiters, VRs, in both byte orders.
WORDS = [b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0",
         b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\x00", b"\xff\xfe\xe0\xdd", b"SQ\0\0", b"UN\0\0",
         b"OB\0\0", b"\xe0\x7f\x10\x00", b"\x02\x00\x10\x00", struct.pack("<L", 8),
         struct.pack("<L", 1 << 30)]


def _marks(data: bytes) -> list[int]:
    """Where pydicom finds element headers (file meta and top level), and every item or
    delimiter tag in either byte order: the places worth mutating."""
    marks = [128, 132]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    for dataset in (ds.file_meta, ds):
        for elem in dataset.elements():
            tell = elem.value_tell if isinstance(elem, RawDataElement) else elem.file_tell
            if tell is not None:
                marks += [tell - 8, tell - 12]
    for tag in (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0",
                b"\xff\xfe\xe0\x00", b"\xe0\x7f\x10\x00"):
        marks += [m.start() for m in re.finditer(re.escape(tag), data)]
    return sorted(m for m in set(marks) if 0 <= m < len(data))


MARKS = {name: _marks(data) for name, data in SEEDS.items()}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with one or two mutations, mostly on element headers: a byte, a word (length,
    delimiter, VR), a cut, elements repeated or removed."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data, marks = bytearray(SEEDS[name]), MARKS[name]
    for _ in range(draw(st.integers(1, 2))):
        mark = draw(st.integers(0, len(marks) - 1))
        at = min(draw(st.one_of(st.just(marks[mark] + draw(st.integers(0, 11))),
                                st.integers(min(132, len(data)), len(data)))), len(data))
        kind = draw(st.sampled_from(["byte", "byte", "word", "word", "cut", "copy", "drop"]))
        if kind == "byte":
            data[at:at + 1] = bytes([draw(st.integers(0, 255))])
        elif kind == "word":
            data[at:at + 4] = draw(st.sampled_from(WORDS))
        elif kind == "cut":
            del data[at:]
        else:  # from one mark to a later one (whole elements, as often as not), here or gone
            start = marks[mark]
            span = data[start:marks[min(mark + draw(st.integers(1, 3)), len(marks) - 1)]]
            if kind == "copy":
                at = marks[draw(st.integers(0, len(marks) - 1))]
                data[at:at] = span
            else:
                del data[start:start + len(span)]
    return bytes(data)


class _CallDepth:
    """A profile function: how many of the walker's own calls are on the stack at most."""

    def __init__(self) -> None:
        self.depth = self.deepest = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if frame.f_code.co_filename != limits.__file__:
            return
        if event == "call":
            self.depth += 1
            self.deepest = max(self.deepest, self.depth)
        elif event == "return":
            self.depth -= 1


def _walks(data: bytes) -> dict[str, Any]:
    """Each way the router walks a file: its walk or its HeaderError. Anything else raised
    fails the test, as does a call depth that grows with the input."""
    source = BytesSource(data)
    ways = {"full": lambda: check_source(source, UNLIMITED),
            "limited": lambda: check_source(source, SMALL),
            "meta": lambda: walk_meta(source)[0],
            "locate": lambda: locate_pixels(source)}
    results: dict[str, Any] = {}
    depth = _CallDepth()
    previous = sys.getprofile()
    sys.setprofile(depth)
    try:
        for way, run in ways.items():
            try:
                results[way] = run()
            except HeaderError as exc:
                results[way] = exc
    finally:
        sys.setprofile(previous)
    # A few helpers deep (5 today), whatever the input: the deepest seed nests 300 levels.
    assert depth.deepest <= 8, f"the walker's calls nest {depth.deepest} deep"
    return results


def _pydicom(data: bytes) -> dict[str, Any] | None:
    """What pydicom's reader makes of the file, or None when it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fp = BytesIO(data)
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            meta_end = fp.tell()
            _read_command_set_elements(fp)
            command_end = fp.tell()
            fp = BytesIO(data)
            header = pydicom.dcmread(fp, stop_before_pixels=True)
            stop = fp.tell()
            pixels = None
            if stop < len(data):  # the element there, as pydicom reads it with the dataset
                whole = pydicom.dcmread(BytesIO(data))
                raw = next(e for e in whole.elements() if isinstance(e, RawDataElement))
                fp.seek(stop)
                pixels = next(data_element_generator(fp, raw.is_implicit_VR,
                                                     raw.is_little_endian))
            return {"meta": _elements(meta), "meta_end": meta_end,
                    "command_set": command_end > meta_end, "top": _elements(header),
                    "encoding": _encoding(header), "stop": stop, "pixels": pixels}
        except Exception:  # any failure: nothing to agree with
            return None


def _elements(dataset: pydicom.Dataset) -> dict[int, tuple[Any, ...]]:
    """tag -> (VR as written, value offset, length) of each top-level element; for one pydicom
    has converted already (an undefined-length sequence, the first file meta element) only
    the value offset, and whether its length is undefined."""
    elements: dict[int, tuple[Any, ...]] = {}
    for elem in dataset.elements():
        if isinstance(elem, RawDataElement):
            elements[elem.tag] = (elem.VR, elem.value_tell, elem.length)
        else:
            elements[elem.tag] = (elem.file_tell, elem.is_undefined_length)
    return elements


def _encoding(dataset: pydicom.Dataset) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) as pydicom read the top level (its original_encoding is
    what the transfer syntax says, not what it switched to)."""
    raw = next((e for e in dataset.elements() if isinstance(e, RawDataElement)), None)
    return None if raw is None else (raw.is_implicit_VR, raw.is_little_endian)


def _same(walked: Walk, read: dict[int, tuple[Any, ...]]) -> None:
    elements: dict[int, tuple[Any, ...]] = {}
    for number, vr, length, start, _ in walked.top:  # as pydicom: the last of a tag counts
        elements[number] = (vr, start, length)
    assert elements.keys() == read.keys()
    for number, (vr, start, length) in elements.items():
        expected = read[number]
        got = (start, length == UNDEFINED) if len(expected) == 2 else (vr, start, length)
        assert got == expected, f"({number >> 16:04X},{number & 0xFFFF:04X})"


def _agree(data: bytes, walks: dict[str, Any], read: dict[str, Any]) -> str:
    full, meta, located = walks["full"], walks["meta"], walks["locate"]
    if isinstance(full, HeaderError):
        assert STRICTER.search(str(full)), f"refused: {full}"
        return "refused"
    assert not isinstance(meta, HeaderError) and not isinstance(located, HeaderError)
    assert meta.header_end == read["meta_end"] == dataset_offset(data)
    _same(meta, read["meta"])
    if read["command_set"]:
        return "command set"
    _same(full, read["top"])
    assert full.header_end == located.header_end == read["stop"]
    assert (located.top, located.pixels) == (full.top, full.pixels)
    if read["encoding"] is not None:  # DICOMweb's way: from where pydicom stopped
        assert full.implicit == read["encoding"][0]
        resumed = locate_pixels(BytesSource(data), (read["stop"], *read["encoding"]))
        assert (resumed.header_end, resumed.pixels) == (full.header_end, full.pixels)
    if full.pixels is None:
        assert read["pixels"] is None
        return "agreed"
    number, _, length, start, _ = full.pixels
    pixels = read["pixels"]
    assert (number, start, length) == (pixels.tag, pixels.value_tell, pixels.length)
    return "agreed, pixels"


def test_the_seeds_are_walked_as_pydicom_reads_them() -> None:
    for name, data in SEEDS.items():
        read = _pydicom(data)
        assert read is not None, name
        assert _agree(data, _walks(data), read).startswith("agreed"), name


def test_mutated_files_are_walked_safely_and_as_pydicom_reads_them() -> None:
    outcomes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def fuzz(data: bytes) -> None:
        walks = _walks(data)
        for way in ("full", "limited"):
            if isinstance(walks[way], HeaderError):
                assert str(walks[way])  # a reason to record
        read = _pydicom(data)
        outcomes["pydicom fails" if read is None else _agree(data, walks, read)] += 1

    fuzz()
    # Most mutations are read by pydicom and compared, in every way the walk can end.
    assert outcomes["agreed"] + outcomes["agreed, pixels"] > EXAMPLES // 4, outcomes
    assert min(outcomes["agreed, pixels"], outcomes["refused"]) > 20, outcomes


def test_dicomweb_finds_the_pixel_data_where_pydicom_reads_it() -> None:
    """Every bundled file with pixel data, SC_rgb_jpeg.dcm included (its transfer syntax says
    explicit VR, its dataset is implicit: pydicom switches, and so does the walker)."""
    found = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in FILES:
            try:
                with path.open("rb") as fp:
                    header = pydicom.dcmread(fp, stop_before_pixels=True)
                    encoding = _encoding(header)
                    if encoding is None or fp.tell() == path.stat().st_size:
                        continue
                    expected = next(data_element_generator(fp, *encoding, defer_size=64))
            except Exception:  # pydicom cannot read it (or inflates it): nothing to compare
                continue
            pixels = open_instance(path).pixels
            assert pixels is not None, path.name
            length = None if expected.length == UNDEFINED else expected.length
            assert (pixels.tag, pixels.offset, pixels.length) == (
                expected.tag, expected.value_tell, length), path.name
            found += 1
    assert found > 100
