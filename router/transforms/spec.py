"""A transform as declared (``[[transforms]]`` in the TOML, or the API): a name, a kind and the
kind's options, validated on construction with one message per bad field.

Kinds: ``deidentify`` (router.transforms.deid), ``morph`` (router.transforms.morph) and
``charset`` (router.transforms.charset).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.transforms.deid import OPTIONS, DeidError, DeidOptions, parse_deid_options
from router.transforms.morph import MorphError, Operation, parse_operations

KINDS = ("deidentify", "morph", "charset")
ENGINE_VERSIONS = {"morph": "morph 1", "charset": "charset 1"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_COMMON = ("name", "kind", "description")
_KIND_KEYS = {"deidentify": ("project", *OPTIONS), "morph": ("ops",), "charset": ()}


class TransformError(ValueError):
    """A transform's declaration is invalid; ``errors`` maps each bad field to a message."""

    def __init__(self, name: str | None, errors: Mapping[str, str]) -> None:
        self.name = name
        self.errors: dict[str, str] = dict(errors)
        listed = "; ".join(f"{key}: {message}" for key, message in self.errors.items())
        super().__init__(f"transform {name or '(unnamed)'!r}: {listed}")


@dataclass(frozen=True)
class TransformSpec:
    """One validated transform; ``data`` is the JSON-safe declaration it was parsed from."""

    name: str
    kind: str
    data: dict[str, Any]
    deid: DeidOptions | None = field(default=None, compare=False)
    ops: tuple[Operation, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


def parse_transform(data: object) -> TransformSpec:
    """A validated :class:`TransformSpec`; :class:`TransformError` listing every bad field."""
    if not isinstance(data, Mapping):
        raise TransformError(None, {"transform": "must be a table / object"})
    name = data.get("name")
    shown = name if isinstance(name, str) else None
    errors: dict[str, str] = {}
    if not isinstance(name, str) or not _NAME.match(name):
        errors["name"] = "required: 1-64 characters of A-Z a-z 0-9 _ . -"
    kind = data.get("kind")
    if kind not in KINDS:
        given = f"unknown kind {kind!r}; " if kind is not None else "required: "
        errors["kind"] = f"{given}one of {', '.join(KINDS)}"
        raise TransformError(shown, errors)
    if not isinstance(data.get("description", ""), str):
        errors["description"] = "expected a string"
    for key in data:
        if key not in _COMMON + _KIND_KEYS[str(kind)]:
            allowed = ", ".join(_COMMON + _KIND_KEYS[str(kind)])
            errors[str(key)] = f"unknown key for a {kind} transform (expected {allowed})"
    deid: DeidOptions | None = None
    ops: tuple[Operation, ...] = ()
    try:
        if kind == "deidentify":
            deid = parse_deid_options(data)
        elif kind == "morph":
            ops = parse_operations(data.get("ops"))
    except (DeidError, MorphError) as exc:
        errors.update(exc.errors)
    if errors:
        raise TransformError(shown, errors)
    return TransformSpec(str(name), str(kind), _json_safe(data), deid=deid, ops=ops)


def _json_safe(data: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy (TOML tables and tuples become dicts and lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value
    return {str(k): plain(v) for k, v in data.items()}


def parse_transform_names(value: object) -> tuple[str, ...]:
    """The ``transforms`` list of a destination or rule: names, each once; ValueError if not."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of transform names")
    if len(set(value)) != len(value):
        raise ValueError("a transform is named more than once")
    return tuple(value)
