"""Path templates: parse-time validation and sanitising of hostile header values."""

from __future__ import annotations

import random
from pathlib import Path, PurePosixPath

import pytest
from pydicom import config
from pydicom.dataset import Dataset

from router.dispatch.file import DEFAULT_FILE_TEMPLATE
from router.dispatch.s3 import DEFAULT_S3_TEMPLATE
from router.dispatch.templates import (
    MAX_VALUE_LENGTH,
    MISSING,
    PathTemplate,
    TemplateError,
    sanitise_value,
)


@pytest.fixture(autouse=True)
def _no_pydicom_value_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile values are set on purpose; pydicom would warn about each of them."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)


HOSTILE = [
    "../../etc/passwd",
    "/abs",
    "..",
    ".",
    "",
    "   ",
    "\x00",
    "a\x00b",
    "..\\..\\windows",
    "C:\\temp",
    "Müller^Jörg",
    "名前",
    "x" * 500,
    "./.",
    "~/.ssh",
    "$(rm -rf /)",
    "a/b/../../..",
]


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _assert_safe(relative: str) -> None:
    parts = relative.split("/")
    assert all(part not in ("", ".", "..") and not part.startswith(".") for part in parts)
    assert "\\" not in relative and "\x00" not in relative and not relative.startswith("/")
    root = Path("/srv/archive")
    assert (root / relative).resolve().is_relative_to(root)


def test_default_templates_parse_and_list_their_keywords() -> None:
    assert PathTemplate.parse(DEFAULT_FILE_TEMPLATE).keywords == (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    )
    assert PathTemplate.parse(DEFAULT_S3_TEMPLATE).keywords[0] == "StudyInstanceUID"


def test_render_keeps_uids_unchanged() -> None:
    header = _header(
        PatientID="PID-1",
        StudyInstanceUID="1.2.3",
        SeriesInstanceUID="1.2.3.4",
        SOPInstanceUID="1.2.3.4.5",
    )
    assert (
        PathTemplate.parse(DEFAULT_FILE_TEMPLATE).render(header)
        == "PID-1/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    )


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_never_leave_the_folder(value: str) -> None:
    template = PathTemplate.parse("{PatientID}/{StudyDescription}/x-{AccessionNumber}.dcm")
    header = Dataset()
    header.PatientID = value
    header.StudyDescription = value
    header.AccessionNumber = value
    relative = template.render(header)
    _assert_safe(relative)
    assert len(relative.split("/")) == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("../../etc/passwd", "_._.._etc_passwd"),
        ("/abs", "_abs"),
        ("..", "_."),
        (".", "_"),
        ("", MISSING),
        (None, MISSING),
        ("  \x00", MISSING),
        ("abc\x00def", "abc_def"),
        ("a\\b", "a_b"),
        ("Müller^Jörg", "M_ller_J_rg"),
        (["ORIGINAL", "PRIMARY"], "ORIGINAL_PRIMARY"),
        (42, "42"),
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2"),
    ],
)
def test_sanitise_value(value: object, expected: str) -> None:
    assert sanitise_value(value) == expected


def test_long_values_are_cut_with_a_hash_that_keeps_them_distinct() -> None:
    a, b = "A" * 200 + "1", "A" * 200 + "2"
    assert len(sanitise_value(a)) == MAX_VALUE_LENGTH
    assert sanitise_value(a) != sanitise_value(b)
    uid = "1." + "2" * 62  # UIDs are at most 64 characters: never cut
    assert sanitise_value(uid) == uid


def test_missing_attribute_renders_unknown() -> None:
    assert PathTemplate.parse("{PatientID}/{SOPInstanceUID}.dcm").render(Dataset()) == (
        "UNKNOWN/UNKNOWN.dcm"
    )


def test_person_names_and_multi_values_render_flat() -> None:
    header = _header(PatientName="Doe^John", ImageType=["ORIGINAL", "PRIMARY"])
    assert PathTemplate.parse("{PatientName}/{ImageType}").render(header) == (
        "Doe_John/ORIGINAL_PRIMARY"
    )


def test_random_hostile_strings_are_always_safe() -> None:
    rng = random.Random(1234)
    alphabet = "./\\\x00 :~$*?ü名-_aZ9{}"
    template = PathTemplate.parse("{PatientID}/{SOPInstanceUID}")
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        _assert_safe(template.render(_header(PatientID=value, SOPInstanceUID=value)))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "non-empty"),
        ("/srv/{SOPInstanceUID}", "relative"),
        ("C:/x/{SOPInstanceUID}", "relative"),
        ("a\\{SOPInstanceUID}", "relative"),
        ("../{SOPInstanceUID}", "'..'"),
        ("a/./{SOPInstanceUID}", "'.'"),
        ("a//{SOPInstanceUID}", "empty"),
        ("{SOPInstanceUID}/", "empty"),
        (".hidden/{SOPInstanceUID}", "start with '.'"),
        ("{NotAKeyword}", "not a DICOM keyword"),
        ("{PatientID:>10}", "not a DICOM keyword"),
        ("{0}", "not a DICOM keyword"),
        ("{PatientID.real}", "not a DICOM keyword"),
        ("{}", "not a DICOM keyword"),
        ("{PixelData}", "binary"),
        ("{ReferencedSeriesSequence}", "sequence"),
        ("a{b", "unmatched"),
        ("a}b", "unmatched"),
        ("{{PatientID}}", "unmatched"),
        ("my files/{SOPInstanceUID}", "letters, digits"),
        ("x" * 600, "longer"),
        ("/".join(["a"] * 20), "components"),
        ("{PatientID}{PatientName}{StudyID}{AccessionNumber}", "255"),
    ],
)
def test_bad_templates_are_refused_with_a_reason(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        PathTemplate.parse(template)


def test_rendered_paths_are_posix_relative() -> None:
    relative = PathTemplate.parse(DEFAULT_S3_TEMPLATE).render(_header(StudyInstanceUID="/x"))
    assert not PurePosixPath(relative).is_absolute()
    assert relative.startswith("_x/UNKNOWN/")
