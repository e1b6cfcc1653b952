"""Synthetic DICOM Part 10 files for tests and benchmarks: CT series, DX radiographs, small MR
images and one very large multi-frame instance written by streaming.

Pixel content is deterministic (fixed numpy seed, never all zeros); UIDs are unique per call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

SEED = 20240115
STUDY_DATE = "20240115"
STUDY_TIME = "093000"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_MAX_DEFINED_LENGTH = 0xFFFFFFFE  # 0xFFFFFFFF means "undefined length"

PerInstance = Callable[[Dataset, int], None]


def make_ct_series(
    folder: str | Path,
    count: int = 500,
    rows: int = 512,
    cols: int = 512,
    study_uid: str | None = None,
    patient_id: str = "SYNTH001",
    slice_thickness: float = 1.0,
) -> list[Path]:
    """Write an axial CT series of ``count`` 16-bit slices (about 0.5 MB each at 512 x 512)."""
    ds = _image_template(CTImageStorage, "CT", patient_id, study_uid, rows, cols)
    ds.SeriesDescription = "SYNTHETIC CHEST 1.0mm"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.SliceThickness = slice_thickness
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    origin = -0.35 * cols

    def place(slice_ds: Dataset, i: int) -> None:
        z = -i * slice_thickness
        slice_ds.ImagePositionPatient = [origin, origin, z]
        slice_ds.SliceLocation = z

    return _write_series(Path(folder), "CT", ds, _phantom(rows, cols), count, place)


def make_dx_images(
    folder: str | Path,
    count: int = 50,
    size_mb: float = 10,
    study_uid: str | None = None,
    patient_id: str = "SYNTH002",
) -> list[Path]:
    """Write ``count`` square 16-bit DX radiographs of about ``size_mb`` MiB each (10: 2290^2)."""
    side = max(16, round((size_mb * 2**20 / 2) ** 0.5))
    ds = _image_template(
        DigitalXRayImageStorageForPresentation, "DX", patient_id, study_uid, side, side
    )
    ds.SeriesDescription = "SYNTHETIC CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.DetectorType = "SCINTILLATOR"
    ds.KVP = "125"
    return _write_series(Path(folder), "DX", ds, _phantom(side, side), count, _no_change)


def make_small_instances(
    folder: str | Path,
    count: int = 1000,
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    patient_id: str = "SYNTH003",
) -> list[Path]:
    """Write ``count`` small MR images (about 9.5 KB each at 64 x 64), one series."""
    ds = _image_template(MRImageStorage, "MR", patient_id, study_uid, rows, cols)
    ds.SeriesDescription = "SYNTHETIC EPI"
    ds.BodyPartExamined = "HEAD"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 2000
    ds.EchoTime = 30
    ds.MagneticFieldStrength = 3
    ds.SliceThickness = 3.0
    ds.PixelSpacing = [3.0, 3.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]

    def place(slice_ds: Dataset, i: int) -> None:
        slice_ds.ImagePositionPatient = [-96.0, -96.0, float(i % 36) * 3.0]
        slice_ds.SliceLocation = float(i % 36) * 3.0
        slice_ds.TemporalPositionIdentifier = i // 36 + 1

    return _write_series(Path(folder), "MR", ds, _phantom(rows, cols), count, place)


def make_large_instance(
    path: str | Path,
    size_bytes: int = 1 << 30,
    rows: int = 512,
    cols: int = 512,
    patient_id: str = "SYNTH004",
) -> Path:
    """Write one multi-frame 16-bit instance with about ``size_bytes`` of pixel data.

    The header is written by pydicom, then the Pixel Data element is appended frame by frame,
    so memory use stays at one frame whatever the size.
    """
    frame_bytes = rows * cols * 2
    frames = max(1, size_bytes // frame_bytes)
    length = frames * frame_bytes
    if length > _MAX_DEFINED_LENGTH:
        raise ValueError(f"{length} bytes of pixel data do not fit a defined-length element")
    ds = _image_template(
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage, "OT", patient_id, None, rows, cols
    )
    ds.SeriesDescription = "SYNTHETIC LARGE MULTI-FRAME"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.FrameTime = 40.0
    ds.InstanceNumber = 1
    _set_instance_uid(ds, generate_uid())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as out:
        out.write(_PIXEL_DATA_TAG + b"OW\x00\x00" + struct.pack("<I", length))
        for frame in _frames(_phantom(rows, cols), frames):
            out.write(frame)
    return path


def pixel_data_length(path: str | Path) -> int:
    """Length of the Pixel Data value in ``path``, read from its header without loading it."""
    return int(_deferred_pixel_data(path).length)


def check_large_instance(path: str | Path) -> int:
    """Check that a large instance reads back; return its Pixel Data length."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    expected = int(header.NumberOfFrames) * header.Rows * header.Columns * 2
    element = _deferred_pixel_data(path)
    found = int(element.length)
    if found != expected or element.value_tell + found != Path(path).stat().st_size:
        raise ValueError(f"{path}: Pixel Data is {found} bytes, header implies {expected}")
    return found


def _deferred_pixel_data(path: str | Path) -> RawDataElement:
    """The Pixel Data element of ``path`` with its value left unread (position and length)."""
    element = pydicom.dcmread(path, defer_size=1024).get_item("PixelData", keep_deferred=True)
    if not isinstance(element, RawDataElement):
        raise ValueError(f"{path}: no deferred Pixel Data element")
    return element


def _image_template(
    sop_class: UID, modality: str, patient_id: str, study_uid: str | None, rows: int, cols: int
) -> Dataset:
    """A dataset with patient, study, series, equipment and 16-bit image pixel attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.AccessionNumber = f"A{patient_id}"[:16]
    ds.Modality = modality
    ds.Manufacturer = "dicom-router synthetic"
    ds.InstitutionName = "Synthetic Imaging Center"
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StationName = "SYNTH01"
    ds.StudyDescription = f"SYNTHETIC {modality} STUDY"
    ds.PatientName = f"SYNTHETIC^{modality}^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    return ds


def _write_series(
    folder: Path, prefix: str, ds: Dataset, pixels: bytes, count: int, per_instance: PerInstance
) -> list[Path]:
    """Write ``count`` instances from one template, changing UIDs, numbers and a few pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(_frames(pixels, count)):
        _set_instance_uid(ds, generate_uid())
        ds.InstanceNumber = i + 1
        per_instance(ds, i)
        ds.PixelData = frame
        path = folder / f"{prefix}{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _set_instance_uid(ds: Dataset, uid: UID) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _no_change(ds: Dataset, i: int) -> None:
    """Nothing per instance beyond the UID, number and pixel stamp."""


def _frames(pixels: bytes, count: int) -> Iterator[bytes]:
    """``count`` copies of ``pixels``, each stamped with its index in the first 8 bytes."""
    frame = bytearray(pixels)
    for i in range(count):
        # 12-bit values so the stamp stays within BitsStored.
        frame[:8] = np.array([i & 0xFFF, (i >> 12) & 0xFFF, 7, 7], "<u2").tobytes()
        yield bytes(frame)


def _phantom(rows: int, cols: int) -> bytes:
    """A deterministic 12-bit body-like phantom with noise, as little-endian uint16 bytes."""
    rng = np.random.default_rng(SEED)
    y, x = np.ogrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    image = np.full((rows, cols), 24.0)  # air, about -1000 HU with intercept -1024
    image[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 1064.0  # soft tissue, 40 HU
    for cx in (-0.35, 0.35):  # lungs
        image[((x - cx) / 0.28) ** 2 + (y / 0.45) ** 2 < 1] = 224.0
    image[x**2 + (y + 0.3) ** 2 < 0.01] = 2024.0  # a bone, 1000 HU
    image += rng.normal(0.0, 20.0, size=(rows, cols))
    return np.clip(image, 0, 4095).astype("<u2").tobytes()
