"""Character-set repair: a data set whose Specific Character Set does not describe its bytes
is re-declared to the one that does, looking at the raw bytes of its text elements.

* declared ``ISO_IR 100`` (Latin-1) or nothing (ASCII), bytes valid UTF-8 and not plain ASCII:
  re-declared ``ISO_IR 192`` (a very common mistake of modalities and converters);
* declared nothing (ASCII) but bytes not ASCII and not UTF-8: re-declared ``ISO_IR 100``;
* declared ``ISO_IR 192`` but bytes not valid UTF-8: re-declared ``ISO_IR 100``.

Other declarations (ISO 2022 code extensions, GB18030...) are left alone: no guess is safe.
The bytes are not changed, only the declaration, so the repair is loss-free.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# VRs whose values are decoded with the Specific Character Set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_LATIN1 = ("ISO_IR 100",)
_ASCII = ("", "ISO_IR 6")
_UTF8 = "ISO_IR 192"
_SPECIFIC_CHARACTER_SET = 0x00080005


def _raw_texts(dataset: Dataset) -> Iterator[bytes]:
    """The undecoded bytes of every text element, through sequences."""
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag)
        if element is None:
            continue
        vr = _vr(tag, element)
        if vr == "SQ":
            for item in dataset[tag].value or ():
                yield from _raw_texts(item)
            continue
        if vr in _TEXT_VRS and isinstance(element, RawDataElement) and element.value:
            yield bytes(element.value)


def _vr(tag: int, element: object) -> str | None:
    """The element's VR; for implicit VR raw elements, the dictionary's (None if unknown)."""
    vr = getattr(element, "VR", None)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    return str(vr)


def _declared(dataset: Dataset) -> str:
    element = dataset.get_item(_SPECIFIC_CHARACTER_SET)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, list | tuple):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def repaired_charset(dataset: Dataset) -> str | None:
    """The Specific Character Set the text bytes call for, or None when none is needed."""
    declared = _declared(dataset)
    if declared not in _LATIN1 + _ASCII + (_UTF8,):
        return None
    texts = [t for t in _raw_texts(dataset) if not t.isascii()]
    if not texts:
        return None
    all_utf8 = all(_utf8(t) for t in texts)
    if declared == _UTF8:
        return None if all_utf8 else _LATIN1[0]
    if all_utf8:
        return _UTF8
    return _LATIN1[0] if declared in _ASCII else None


def repair_charset(dataset: Dataset) -> str:
    """Re-declare the character set of ``dataset`` (read from a file, not yet decoded) when its
    bytes call for it; returns a short note of what was done ("" when nothing).

    Text elements still undecoded keep their bytes and are decoded with the new declaration
    when read; sequence items already read inherit it. An element read before is kept as it was
    decoded: apply_chain (router/transforms/chain.py) runs charset repairs first."""
    wanted = repaired_charset(dataset)
    if wanted is None:
        return ""
    before = _declared(dataset) or "(none)"
    dataset.SpecificCharacterSet = wanted
    _redeclare(dataset, convert_encodings(wanted))
    _inherit(dataset, convert_encodings(wanted))
    return f"Specific Character Set {before} -> {wanted}"


def _inherit(dataset: Dataset, encodings: list[str]) -> None:
    """Items of sequences already read take the new declaration (unless they have their own)."""
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag)
        if element is None or isinstance(element, RawDataElement) or element.VR != "SQ":
            continue
        for item in element.value or ():
            if _SPECIFIC_CHARACTER_SET not in item:
                item._parent_encoding = encodings
                _redeclare(item, encodings)
                _inherit(item, encodings)


def _redeclare(dataset: Dataset, encodings: list[str]) -> None:
    """pydicom decodes raw elements with the encoding the data set was read with (its public
    setter keeps the VR and byte order it was read with, None for a data set made in memory)."""
    implicit, little = dataset.original_encoding
    dataset.set_original_encoding(implicit, little, encodings)
