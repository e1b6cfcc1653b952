"""Path and object-key templates such as ``{StudyInstanceUID}/{SOPInstanceUID}.dcm``.

Templates are checked when a destination is configured; every value taken from a received
header is sanitised so that no received string can leave the destination folder or prefix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MISSING = "UNKNOWN"
MAX_VALUE_LENGTH = 64  # a UID (64 chars) always fits uncut
MAX_TEMPLATE_LENGTH = 512
MAX_COMPONENTS = 16
MAX_COMPONENT_LENGTH = 255  # NAME_MAX on common file systems
_HASH_CHARS = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LITERAL = re.compile(r"^[A-Za-z0-9._-]*$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
# Values of these VRs are bytes or nested datasets, never a sensible path component.
_UNUSABLE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


class TemplateError(ValueError):
    """A template is malformed or unsafe (the message names the problem, not header values)."""


def sanitise_value(value: object) -> str:
    """One header value as a safe path component (``[A-Za-z0-9._-]``, never ``.``/``..``).

    Missing or empty values become ``UNKNOWN``; other characters become ``_``; a leading dot
    becomes ``_`` (no hidden files, no ``.``/``..``); values longer than 64 characters are cut
    and given a hash suffix of the full value so that distinct long values stay distinct.
    """
    if value is None:
        return MISSING
    if isinstance(value, MultiValue | list | tuple):
        text = "_".join(str(v) for v in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", errors="replace")
    else:
        text = str(value)
    text = text.strip(" \x00")
    if not text:
        return MISSING
    safe = _UNSAFE.sub("_", text)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if len(safe) > MAX_VALUE_LENGTH:
        digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        safe = safe[: MAX_VALUE_LENGTH - _HASH_CHARS - 1] + "_" + digest[:_HASH_CHARS]
    return safe


@dataclass(frozen=True)
class PathTemplate:
    """A validated template: relative, ``/``-separated, ``{Keyword}`` placeholders only."""

    text: str
    components: tuple[tuple[tuple[str, str], ...], ...]  # per component: (literal, keyword)

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        """Validate ``text``; :class:`TemplateError` says what is wrong with it."""
        if not isinstance(text, str) or not text:
            raise TemplateError("template must be a non-empty string")
        if len(text) > MAX_TEMPLATE_LENGTH:
            raise TemplateError(f"template is longer than {MAX_TEMPLATE_LENGTH} characters")
        if text.startswith("/") or "\\" in text or re.match(r"^[A-Za-z]:", text):
            raise TemplateError("template must be a relative path using '/' separators")
        parts = text.split("/")
        if len(parts) > MAX_COMPONENTS:
            raise TemplateError(f"template has more than {MAX_COMPONENTS} path components")
        return cls(text=text, components=tuple(_parse_component(p) for p in parts))

    @property
    def keywords(self) -> tuple[str, ...]:
        """The DICOM keywords the template uses, in order of appearance."""
        return tuple(kw for comp in self.components for _, kw in comp if kw)

    def render(self, header: Dataset) -> str:
        """The relative path for ``header``: sanitised values, ``/`` between components."""
        rendered = []
        for component in self.components:
            text = "".join(
                literal + (sanitise_value(header.get(kw)) if kw else "")
                for literal, kw in component
            )
            # Unreachable given parse() and sanitise_value(); kept as a last line of defence.
            if text in ("", ".", "..") or "/" in text or "\x00" in text:
                raise TemplateError("template produced an unsafe path component")
            rendered.append(text)
        return "/".join(rendered)


def _parse_component(part: str) -> tuple[tuple[str, str], ...]:
    """Split one component into (literal, keyword) pairs, checking both."""
    if part in ("", ".", ".."):
        raise TemplateError("template components must not be empty, '.' or '..'")
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(part):
        pieces.append((_check_literal(part[position : match.start()]), _check_keyword(match[1])))
        position = match.end()
    tail = _check_literal(part[position:])
    if tail:
        pieces.append((tail, ""))
    if part.startswith("."):
        raise TemplateError("template components must not start with '.'")
    worst = sum(len(lit) + (MAX_VALUE_LENGTH if kw else 0) for lit, kw in pieces)
    if worst > MAX_COMPONENT_LENGTH:
        raise TemplateError(
            f"a template component could grow beyond {MAX_COMPONENT_LENGTH} characters"
        )
    return tuple(pieces)


def _check_literal(literal: str) -> str:
    if "{" in literal or "}" in literal:
        raise TemplateError("template has an unmatched '{' or '}'")
    if not _LITERAL.match(literal):
        raise TemplateError("template text may only use letters, digits, '.', '_' and '-'")
    return literal


def _check_keyword(keyword: str) -> str:
    if not _KEYWORD.match(keyword):
        raise TemplateError(
            f"placeholder {{{keyword}}} is not a DICOM keyword (formats and indexes "
            "are not supported)"
        )
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise TemplateError(f"placeholder {{{keyword}}} is not a DICOM keyword")
    if set(dictionary_VR(tag).split(" or ")) & _UNUSABLE_VRS:
        raise TemplateError(f"{keyword} holds binary data or a sequence; it cannot be used")
    return keyword
