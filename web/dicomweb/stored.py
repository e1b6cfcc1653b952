"""A stored instance opened for WADO: its header (everything before the pixel data), where the
pixel data lies in the file, its frames as stored or decoded, and the whole instance re-encoded
as Explicit VR Little Endian.

Frames as stored are read straight from the file: uncompressed ones sliced at their offset,
compressed ones from their fragments (pydicom's get_frame), so frame 1 of a 1 GB instance costs
one frame. Everything here is synchronous: callers run it in a thread.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pack_bits, pixel_array, unpack_bits
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from router.dicom.decode_log import handled_decode
from router.dicom.limits import PIXEL_TAGS, UNDEFINED, FileSource, HeaderError, locate_pixels
from router.dispatch.transcode import to_little_endian

logger = logging.getLogger(__name__)


class DecodeError(Exception):
    """The stored pixel data cannot be decoded here (the message names the transfer syntax)."""


@dataclass(frozen=True)
class PixelElement:
    tag: int
    vr: str
    offset: int  # of the value's first byte in the file
    length: int | None  # None: encapsulated (undefined length)


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    header: Dataset
    pixels: PixelElement | None
    transfer_syntax: UID

    @property
    def frames(self) -> int:
        try:
            return max(int(self.header.get("NumberOfFrames") or 1), 1)
        except (TypeError, ValueError):
            return 1

    @property
    def encapsulated(self) -> bool:
        return self.pixels is not None and self.pixels.length is None

    @property
    def sliceable(self) -> bool:
        """Uncompressed little endian frames on whole bytes: read from the file directly."""
        ts = self.transfer_syntax
        return (self.pixels is not None and not self.encapsulated and ts.is_little_endian
                and ts != DeflatedExplicitVRLittleEndian
                and int(self.header.get("BitsAllocated", 8)) % 8 == 0)


def decodable(ts: str) -> bool:
    """Whether instances stored in ``ts`` can be turned into Explicit VR Little Endian."""
    uid = UID(ts)
    if not uid.is_compressed:
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def open_instance(path: Path) -> StoredInstance:
    with path.open("rb") as fp:
        header = dcmread(fp, stop_before_pixels=True)
        ts = UID(header.file_meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)
        pixels = None if ts == DeflatedExplicitVRLittleEndian else _pixel_element(fp, header)
    if ts == DeflatedExplicitVRLittleEndian:
        pixels = _deflated_pixels(path)
    return StoredInstance(path, header, pixels, ts)


def _pixel_element(fp: io.BufferedReader, header: Dataset) -> PixelElement | None:
    """The top-level pixel data element, where pydicom's reader stopped before it (read by the
    walker of router.dicom.limits, in the encoding that reader switched to if it did)."""
    resume = None  # no element read as is tells how: the walker finds out from the start
    for key in header.keys():  # noqa: SIM118 - keys, not converted elements
        raw = header.get_item(key)
        if isinstance(raw, RawDataElement):
            resume = (fp.tell(), raw.is_implicit_VR, raw.is_little_endian)
            break
    try:
        pixels = locate_pixels(FileSource(fp), resume).pixels
    except HeaderError as exc:  # stored before the receipt walked objects, or damaged since
        logger.warning("the pixel data of a stored instance could not be located: %s", exc)
        return None
    if pixels is None:
        return None
    tag, vr, length, offset, _ = pixels
    if vr is None:  # implicit VR: pixel data is OW (PS3.5 A.1), float pixel data OF / OD
        vr = dictionary_VR(tag).split(" ")[-1]
    return PixelElement(tag, vr, offset, None if length == UNDEFINED else length)


def _deflated_pixels(path: Path) -> PixelElement | None:
    """A deflated file cannot be sliced: only say which pixel element it has (offset -1)."""
    ds = dcmread(path)
    for tag in sorted(PIXEL_TAGS, reverse=True):  # Pixel Data first
        if tag in ds:
            return PixelElement(tag, ds[tag].VR, -1, len(ds[tag].value))
    return None


def little_endian(ds: Dataset) -> Dataset:
    """``ds`` re-encoded little endian in place if it was read big endian."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and not UID(ts).is_little_endian:
        to_little_endian(ds)
    return ds


def full_dataset(path: Path) -> Dataset:
    """The whole stored dataset, little endian whatever the stored byte order."""
    return little_endian(dcmread(path))


def decode_frame(inst: StoredInstance, index: int, raw: bool = False) -> np.ndarray:
    """Frame ``index`` as an array (pydicom reads only that frame from the file; a deflated
    file is inflated whole first). ``raw`` keeps YCbCr as stored instead of RGB."""
    source: Path | Dataset = inst.path
    if inst.transfer_syntax == DeflatedExplicitVRLittleEndian:
        source = dcmread(inst.path)
    try:
        with handled_decode():
            return pixel_array(source, index=index, raw=raw)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        logger.warning("decoding a %s frame failed: %s", inst.transfer_syntax.name,
                       type(exc).__name__)
        raise DecodeError(f"the {inst.transfer_syntax.name} pixel data could not be"
                          " decoded") from None


def frame_bytes(inst: StoredInstance, index: int, ts: str) -> bytes:
    """Frame ``index`` (0-based) in transfer syntax ``ts``: as stored for compressed data,
    Explicit VR Little Endian otherwise (decoded when stored compressed).
    """
    if inst.pixels is None:
        raise DecodeError("the instance has no pixel data")
    if inst.encapsulated and ts == inst.transfer_syntax:
        with inst.path.open("rb") as fp:
            fp.seek(inst.pixels.offset)
            return get_frame(fp, index, number_of_frames=inst.frames,
                             extended_offsets=_extended_offsets(inst.header))
    if inst.encapsulated:
        return _decoded_frame(inst, index)
    size = frame_length(inst)
    if inst.sliceable and size is not None:
        with inst.path.open("rb") as fp:
            fp.seek(inst.pixels.offset + index * size)
            return fp.read(size)
    return _native_frame(inst, index)


def frame_length(inst: StoredInstance) -> int | None:
    """Bytes per uncompressed frame; None when frames are not whole bytes (1-bit data)."""
    if int(inst.header.get("BitsAllocated", 8)) % 8:
        return None
    try:
        return get_expected_length(inst.header, "bytes") // inst.frames
    except (AttributeError, KeyError, TypeError, ValueError):
        assert inst.pixels is not None and inst.pixels.length is not None
        return inst.pixels.length // inst.frames


def _extended_offsets(header: Dataset) -> tuple[bytes, bytes] | None:
    if "ExtendedOffsetTable" in header and "ExtendedOffsetTableLengths" in header:
        return header.ExtendedOffsetTable, header.ExtendedOffsetTableLengths
    return None


def _native_frame(inst: StoredInstance, index: int) -> bytes:
    """Big endian, deflated or 1-bit data: decoded from the whole dataset, little endian."""
    ds = full_dataset(inst.path)
    data = ds[inst.pixels.tag if inst.pixels else 0x7FE00010].value
    size = frame_length(inst)
    if size is not None:
        return bytes(data[index * size:(index + 1) * size])
    per_frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    bits = np.asarray(unpack_bits(data))[index * per_frame:(index + 1) * per_frame]
    return pack_bits(bits, pad=False)


def _decoded_frame(inst: StoredInstance, index: int) -> bytes:
    """A compressed frame decoded to little endian samples (colour as pydicom returns it:
    YCbCr JPEG comes back as RGB, planes interleaved)."""
    array = decode_frame(inst, index)
    return bytes(array.astype(array.dtype.newbyteorder("<")).tobytes())


def explicit_le(path: Path) -> bytes:
    """The whole instance as a Part 10 file in Explicit VR Little Endian (same UIDs)."""
    ds = dcmread(path)
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if stored.is_compressed and "PixelData" in ds:
        try:
            with handled_decode():
                ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # decoders raise many types; all mean "cannot decode"
            logger.warning("decompressing %s failed: %s", stored.name, type(exc).__name__)
            raise DecodeError(f"the {stored.name} pixel data could not be decoded") from None
    elif not stored.is_little_endian:
        to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    try:
        ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except Exception as exc:  # a stored element pydicom cannot write in the new encoding
        logger.warning("re-encoding an instance stored as %s failed: %s", stored.name,
                       type(exc).__name__)
        raise DecodeError(f"the {stored.name} instance could not be re-encoded") from None
    return out.getvalue()

