"""Re-encoding a stored instance for a DICOM peer that refuses its transfer syntax:
decompression to Explicit VR Little Endian, and big endian to little endian.
"""

from __future__ import annotations

import logging

import numpy
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from router.dicom.decode_log import handled_decode
from router.dispatch.base import Outgoing, PermanentDeliveryError, TransientDeliveryError

logger = logging.getLogger(__name__)

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def read_dataset(item: Outgoing) -> Dataset:
    try:
        return dcmread(item.path)
    except OSError as exc:
        raise blob_error(exc) from None


def blob_error(exc: OSError) -> TransientDeliveryError:
    return TransientDeliveryError(f"cannot read the stored blob: errno {exc.errno}")


def decoded_for_peer(item: Outgoing, sop_name: str, where: str) -> tuple[Dataset, str]:
    """The full dataset, decompressed to Explicit VR Little Endian if stored compressed."""
    stored = UID(item.transfer_syntax_uid)
    dataset = read_dataset(item)
    if not stored.is_compressed:
        if not stored.is_little_endian:
            to_little_endian(dataset)
        return dataset, f" (converted from {stored.name})"
    try:
        # Same instance, other encoding: pydicom would otherwise mint a new SOP Instance UID.
        with handled_decode():
            dataset.decompress(generate_instance_uid=False)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        logger.warning("decompressing %s failed: %s", stored.name, type(exc).__name__)
        raise PermanentDeliveryError(
            f"{where} accepts {sop_name} only uncompressed and {stored.name} "
            f"cannot be decompressed here ({type(exc).__name__})"
        ) from None
    return dataset, f" (decompressed from {stored.name})"


def to_little_endian(dataset: Dataset) -> None:
    """Re-encode a big endian data set as Explicit VR Little Endian (pynetdicom will not).

    Decoding every element lets pydicom write numbers little endian; binary values, which
    pydicom leaves alone, are swapped in their word size: OW in 16-bit words (PS3.5 7.3), but
    the Pixel Data in units of Bits Allocated, as pydicom reads 32-bit big endian pixels.
    """
    pixel_data = dataset.get(_PIXEL_DATA)  # a tag key gives the element, not its value
    # OW is swapped in 16-bit words even when the samples are 8 bits.
    word = 2 if pixel_data is not None and pixel_data.VR == "OW" else 1
    pixel_size = max(int(dataset.get("BitsAllocated", 16)) // 8, word)
    for element in dataset.iterall():  # iterating decodes raw elements with the old encoding
        size = pixel_size if element is pixel_data else _WORD_SIZES.get(element.VR)
        if size and isinstance(element.value, bytes) and len(element.value) % size == 0:
            element.value = _swapped(element.value, size)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.set_original_encoding(False, True, dataset.original_character_set)


def _swapped(data: bytes, size: int) -> bytes:
    return numpy.frombuffer(data, dtype=f">u{size}").astype(f"<u{size}").tobytes()
