"""Tag morphing: set, copy, delete and regex-replace operations on any element (private ones by
creator, elements inside sequences), each optionally under conditions on the data set's values
or on the calling AE title.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from router.transforms.paths import PathError, TagPath, parse_path

OPS = ("set", "copy", "delete", "replace")
_OP_KEYS = {"set": {"tag", "value", "vr"}, "copy": {"tag", "from", "vr"}, "delete": {"tag"},
            "replace": {"tag", "pattern", "with"}}
_VR = re.compile(r"^[A-Z]{2}$")
# Binary numbers take Python numbers (a backslash separates values); these VRs take no text.
_NUMBERS: dict[str, type] = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int,
                             "FL": float, "FD": float}
_NO_TEXT = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"})


class MorphError(ValueError):
    """An operation's options are invalid; ``errors`` maps ``ops[i].key`` to a message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


@dataclass(frozen=True)
class Condition:
    """``calling_aet`` (``*``/``?`` pattern) or a tag with ``equals`` / ``matches`` / ``exists``."""

    path: TagPath | None
    calling_aet: re.Pattern[str] | None = None
    equals: str | None = None
    matches: re.Pattern[str] | None = None
    exists: bool | None = None

    def holds(self, dataset: Dataset, calling_aet: str) -> bool:
        if self.calling_aet is not None:
            return self.calling_aet.fullmatch(calling_aet) is not None
        assert self.path is not None
        values = _values(dataset, self.path)
        if self.exists is not None:
            return bool(values) == self.exists
        if self.equals is not None:
            return self.equals in values
        assert self.matches is not None
        return any(self.matches.search(v) for v in values)


@dataclass(frozen=True)
class Operation:
    """One operation of a morph transform, with the conditions that must all hold."""

    op: str
    path: TagPath
    value: str | None = None
    vr: str | None = None
    source: TagPath | None = None
    pattern: re.Pattern[str] | None = None
    replacement: str = ""
    when: tuple[Condition, ...] = ()

    def apply(self, dataset: Dataset, calling_aet: str) -> int:
        """Apply to ``dataset`` in place; returns how many elements changed."""
        if not all(c.holds(dataset, calling_aet) for c in self.when):
            return 0
        if self.op == "copy":
            assert self.source is not None
            found = _values(dataset, self.source)
            if not found:
                return 0
            return _set(dataset, self.path, found[0] if len(found) == 1 else found, self.vr)
        if self.op == "set":
            return _set(dataset, self.path, self.value or "", self.vr)
        if self.op == "delete":
            return _delete(dataset, self.path)
        return _replace(dataset, self.path, self.pattern, self.replacement)


def _values(dataset: Dataset, path: TagPath) -> list[str]:
    values: list[str] = []
    for parent in path.parents(dataset):
        tag = path.leaf.resolve(parent)
        if tag is None or tag not in parent:
            continue
        value = parent[tag].value
        if isinstance(value, list | MultiValue):
            values += [str(v) for v in value]
        elif value not in (None, b"", ""):
            values.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return values


def _typed(value: Any, vr: str) -> Any:
    """Text as the element's VR needs it: numbers for US, SS, UL, SL, UV, SV, FL, FD
    (ValueError when not a number), else unchanged."""
    convert = _NUMBERS.get(vr)
    if convert is None:
        return value
    if value == "":
        return None  # emptied
    parts = value if isinstance(value, list) else str(value).split("\\")
    numbers = [convert(str(part).strip()) for part in parts]
    return numbers[0] if len(numbers) == 1 else numbers


def _set(dataset: Dataset, path: TagPath, value: Any, vr: str | None) -> int:
    changed = 0
    for parent in path.parents(dataset):
        tag = path.leaf.resolve(parent, create=True)
        assert tag is not None
        if tag in parent and parent[tag].VR != "UN":  # UN (implicit VR, private): re-made
            element = parent[tag]
            if element.VR in _NO_TEXT:
                raise TypeError(f"cannot set a {element.VR} element")
            element.value = _typed(value, element.VR)
        else:
            new_vr = vr or path.default_vr() or "LO"
            parent.add_new(tag, new_vr, _typed(value, new_vr))
        changed += 1
    return changed


def _delete(dataset: Dataset, path: TagPath) -> int:
    changed = 0
    for parent in path.parents(dataset):
        tag = path.leaf.resolve(parent)
        if tag is not None and tag in parent:
            del parent[tag]
            changed += 1
    return changed


def _replace(dataset: Dataset, path: TagPath, pattern: re.Pattern[str] | None,
             replacement: str) -> int:
    assert pattern is not None
    changed = 0
    for parent in path.parents(dataset):
        tag = path.leaf.resolve(parent)
        if tag is None or tag not in parent or parent[tag].VR == "SQ":
            continue
        element = parent[tag]
        old = element.value
        if isinstance(old, list | MultiValue):
            new: Any = [pattern.sub(replacement, str(v)) for v in old]
            differs = new != [str(v) for v in old]
        elif old is None or isinstance(old, bytes):
            continue
        else:
            new = pattern.sub(replacement, str(old))
            differs = new != str(old)
        if differs:
            element.value = _typed(new, element.VR)
            changed += 1
    return changed


# -- parsing ---------------------------------------------------------------------------------


def parse_operations(ops: object) -> tuple[Operation, ...]:
    """The ``ops`` list of a morph transform; :class:`MorphError` naming every bad field."""
    if not isinstance(ops, list | tuple) or not ops:
        raise MorphError({"ops": "required: a non-empty list of operations "
                                 "(each a table with op and tag)"})
    parsed: list[Operation] = []
    errors: dict[str, str] = {}
    for i, item in enumerate(ops):
        try:
            parsed.append(_operation(item))
        except MorphError as exc:
            errors.update({f"ops[{i}].{k}" if k else f"ops[{i}]": v for k, v in exc.errors.items()})
    if errors:
        raise MorphError(errors)
    return tuple(parsed)


def _operation(item: object) -> Operation:
    if not isinstance(item, Mapping):
        raise MorphError({"": "expected a table with op and tag"})
    op = item.get("op")
    if op not in OPS:
        raise MorphError({"op": f"expected one of {', '.join(OPS)}, got {op!r}"})
    unknown = set(item) - _OP_KEYS[op] - {"op", "when"}
    if unknown:
        raise MorphError({sorted(unknown)[0]: f"unknown key for a {op} operation (expected "
                                              f"{', '.join(sorted(_OP_KEYS[op]))}, when)"})
    path = _path(item, "tag")
    vr = item.get("vr")
    if vr is not None and (not isinstance(vr, str) or not _VR.match(vr)):
        raise MorphError({"vr": f"expected a two-letter VR such as 'LO', got {vr!r}"})
    if op in ("set", "copy") and vr is None and path.default_vr() is None:
        raise MorphError({"vr": f"required: {path.text!r} is not in the DICOM dictionary"})
    target_vr = vr or path.default_vr()
    if op in ("set", "copy") and target_vr in _NO_TEXT:
        raise MorphError({"tag": f"{path.text!r} is a {target_vr} element: set and copy write "
                                 "text or numbers only"})
    when = _conditions(item.get("when", []))
    if op == "set":
        value = item.get("value")
        if not isinstance(value, str):
            raise MorphError({"value": f"required: a string, got {value!r}"})
        try:
            _typed(value, str(target_vr))
            for part in value.split("\\") if value and target_vr in ("IS", "DS") else ():
                (int if target_vr == "IS" else float)(part)  # numbers as text
        except ValueError:
            raise MorphError({"value": f"expected a number for {path.text!r} (VR {target_vr};"
                                       f" several separated by \\), got {value!r}"}) from None
        return Operation(op, path, value=value, vr=vr, when=when)
    if op == "copy":
        return Operation(op, path, source=_path(item, "from"), vr=vr, when=when)
    if op == "replace":
        replacement = item.get("with", "")
        if not isinstance(replacement, str):
            raise MorphError({"with": f"expected a string, got {replacement!r}"})
        return Operation(op, path, pattern=_regex(item, "pattern"), replacement=replacement,
                         when=when)
    return Operation(op, path, when=when)


def _path(item: Mapping[str, object], key: str) -> TagPath:
    try:
        return parse_path(item.get(key))
    except PathError as exc:
        raise MorphError({key: str(exc) if item.get(key) else f"required: {exc}"}) from None


def _regex(item: Mapping[str, object], key: str) -> re.Pattern[str]:
    text = item.get(key)
    if not isinstance(text, str) or not text:
        raise MorphError({key: "required: a regular expression"})
    try:
        return re.compile(text)
    except re.error as exc:
        raise MorphError({key: f"not a valid regular expression: {exc}"}) from None


def _conditions(value: object) -> tuple[Condition, ...]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise MorphError({"when": "expected a list of conditions"})
    conditions = []
    for i, item in enumerate(value):
        try:
            conditions.append(parse_condition(item))
        except MorphError as exc:
            raise MorphError({f"when[{i}].{k}": v for k, v in exc.errors.items()}) from None
    return tuple(conditions)


def parse_condition(item: object) -> Condition:
    """``{calling_aet = "CT_*"}`` or ``{tag = ..., equals|matches = ...}`` or ``exists``."""
    if not isinstance(item, Mapping):
        raise MorphError({"": "expected a table"})
    if "calling_aet" in item:
        pattern = item["calling_aet"]
        if not isinstance(pattern, str) or not pattern or len(item) != 1:
            raise MorphError({"calling_aet": "expected one AE title pattern (* and ? allowed) "
                                             "and no other key"})
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return Condition(None, calling_aet=re.compile(regex))
    path = _path(item, "tag")
    tests = [k for k in ("equals", "matches", "exists") if k in item]
    if len(tests) != 1 or set(item) - {"tag", *tests}:
        raise MorphError({"tag": "a condition needs exactly one of equals, matches, exists"})
    if tests[0] == "equals":
        if not isinstance(item["equals"], str):
            raise MorphError({"equals": "expected a string"})
        return Condition(path, equals=item["equals"])
    if tests[0] == "exists":
        if not isinstance(item["exists"], bool):
            raise MorphError({"exists": "expected true or false"})
        return Condition(path, exists=item["exists"])
    return Condition(path, matches=_regex(item, "matches"))
