"""Tag paths of the tag-morphing transform: which element(s) of a data set an operation means.

A path is one or more steps joined by ``.``; a step is a keyword (``PatientID``), a tag
(``(0010,0020)``) or a private element by creator and element byte (``(0009,"ACME 1.1",10)``),
and a sequence step names its items with ``[*]`` (all) or ``[n]`` (one, from 0):
``RequestAttributesSequence[*].RequestedProcedureDescription``, ``(0040,0275)[*].(0032,1060)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

_STEP = re.compile(
    r'\((?P<g>[0-9A-Fa-f]{4}),(?P<e>[0-9A-Fa-f]{4})\)'
    r'|\((?P<pg>[0-9A-Fa-f]{4}),"(?P<creator>[^"]{1,64})",(?P<pe>[0-9A-Fa-f]{2})\)'
    r"|(?P<kw>[A-Za-z][A-Za-z0-9]*)"
)
_ITEMS = re.compile(r"\[(?P<items>\*|\d{1,6})\]")


class PathError(ValueError):
    """A tag path cannot be parsed; the message says where and why."""


@dataclass(frozen=True)
class Step:
    """One step: a plain tag, or a private element (group, creator, element byte)."""

    tag: int | None = None
    group: int | None = None
    creator: str = ""
    offset: int = 0
    items: str | None = None  # "*", a decimal index, or None for the last step

    @property
    def private(self) -> bool:
        return self.tag is None

    def resolve(self, dataset: Dataset, create: bool = False) -> BaseTag | None:
        """The tag in ``dataset``; a private one only if its creator is there (or created)."""
        if self.tag is not None:
            return Tag(self.tag)
        assert self.group is not None
        try:
            block = dataset.private_block(self.group, self.creator, create=create)
        except KeyError:
            return None
        return Tag(block.get_tag(self.offset))

    def label(self) -> str:
        if self.tag is not None:
            return keyword_for_tag(self.tag) or f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"
        return f'({self.group:04X},"{self.creator}",{self.offset:02X})'


@dataclass(frozen=True)
class TagPath:
    """A parsed path; :meth:`targets` walks a data set to the elements it names."""

    text: str
    steps: tuple[Step, ...]

    @property
    def leaf(self) -> Step:
        return self.steps[-1]

    def default_vr(self) -> str | None:
        """The dictionary VR of the last step, or None (private, or unknown tag)."""
        if self.leaf.tag is None:
            return None
        try:
            return str(dictionary_VR(self.leaf.tag))
        except KeyError:
            return None

    def parents(self, dataset: Dataset) -> Iterator[Dataset]:
        """Every data set (the top one, or sequence items) holding the last step."""
        yield from _walk(dataset, self.steps[:-1])


def _walk(dataset: Dataset, steps: tuple[Step, ...]) -> Iterator[Dataset]:
    if not steps:
        yield dataset
        return
    step, rest = steps[0], steps[1:]
    tag = step.resolve(dataset)
    if tag is None or tag not in dataset:
        return
    element = dataset[tag]
    if element.VR != "SQ":
        return
    items = list(element.value or ())
    chosen = items if step.items == "*" else items[int(step.items or 0):int(step.items or 0) + 1]
    for item in chosen:
        yield from _walk(item, rest)


def parse_path(text: object) -> TagPath:
    """A :class:`TagPath` from its text; :class:`PathError` naming the bad step."""
    if not isinstance(text, str) or not text.strip():
        raise PathError("expected a tag path such as 'PatientID' or '(0040,0275)[*].(0032,1060)'")
    steps: list[Step] = []
    pos = 0
    while True:
        match = _STEP.match(text, pos)
        if match is None:
            raise PathError(f"{text!r}: cannot read a tag at character {pos + 1} (expected a "
                            'keyword, (gggg,eeee) or (gggg,"creator",ee))')
        step = _step(match, text)
        pos = match.end()
        items = _ITEMS.match(text, pos)
        if items is not None:
            step = Step(step.tag, step.group, step.creator, step.offset, items["items"])
            pos = items.end()
        steps.append(step)
        if pos == len(text):
            break
        if text[pos] != "." or step.items is None:
            raise PathError(f"{text!r}: at character {pos + 1}: a step inside a sequence needs "
                            "[*] or [n] after the sequence, then '.'")
        pos += 1
    if steps[-1].items is not None:
        raise PathError(f"{text!r}: the last step names an element, not sequence items")
    return TagPath(text, tuple(steps))


def _step(match: re.Match[str], text: str) -> Step:
    if match["kw"]:
        tag = tag_for_keyword(match["kw"])
        if tag is None:
            raise PathError(f"{text!r}: {match['kw']!r} is not a DICOM keyword")
        return Step(tag=tag)
    if match["pg"]:
        group = int(match["pg"], 16)
        if group % 2 == 0:
            raise PathError(f"{text!r}: group {match['pg']} is not private (odd groups are)")
        return Step(group=group, creator=match["creator"], offset=int(match["pe"], 16))
    return Step(tag=(int(match["g"], 16) << 16) | int(match["e"], 16))
