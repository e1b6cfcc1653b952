"""Handled pixel decode failures log one line without a traceback (router/dicom/decode_log.py):
a corrupt JPEG 2000 frame asked for through the WADO code path leaves one warning of ours and
none of pydicom's traceback records; outside such a handled call, pydicom's records stay.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array

from router.dicom.decode_log import handled_decode
from web.dicomweb.stored import DecodeError, decode_frame, explicit_le, open_instance


@pytest.fixture
def corrupt_j2k(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm", download=False))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    path = tmp_path / "corrupt.dcm"
    ds.save_as(path)
    return path


def with_tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text]


def test_a_frame_that_cannot_be_decoded_logs_one_line(
        corrupt_j2k: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inst = open_instance(corrupt_j2k)
    with pytest.raises(DecodeError):
        decode_frame(inst, 0)
    with pytest.raises(DecodeError):
        explicit_le(corrupt_j2k)
    assert with_tracebacks(caplog) == []
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in ours] == ["web.dicomweb.stored"] * 2
    assert "JPEG 2000" in ours[0].getMessage() and "\n" not in ours[0].getMessage()


def test_unhandled_decoding_keeps_pydicom_tracebacks(
        corrupt_j2k: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError):
        pixel_array(corrupt_j2k, index=0)
    assert with_tracebacks(caplog), "pydicom's own records are only dropped where handled"
    caplog.clear()
    with pytest.raises(ValueError), handled_decode():
        raise ValueError("not a pixel coder record")
    with handled_decode():
        logging.getLogger("web.dicomweb.stored").error("kept", exc_info=(ValueError, None, None))
    assert len(with_tracebacks(caplog)) == 1  # other loggers keep theirs inside it too
