"""The pieces every configuration model shares: reusable annotated types (durations, AE titles,
networks, folders) and one error format with paths.

Settings, destinations, rules and remote nodes are frozen standard-library dataclasses whose
annotations are the one description of their keys, types and ranges; pydantic validates them
(:func:`validated`, with each class's ``__pydantic_config__``) where configuration comes in:
the TOML file, the environment, API bodies. pydantic is imported only then: the metadata here
(:class:`Before`, :class:`After`, annotated_types' ranges) tells it what to do when it reads
the annotations, so a process that only *uses* settings, such as a receiver process, never
loads it (about 10 MB per process). Errors become :class:`Problem` lines through
:func:`problems_of`: ``dicom.max_associations: must be at most 1000, got 5000``,
``destinations[2].port: required``, ``storage.retension_days: unknown key (did you mean
'retention_days'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import annotated_types as at

if TYPE_CHECKING:
    from pydantic import ValidationError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
MAX_CONCURRENCY = 16
MAX_DESCRIPTION = 500


class SettingsError(ValueError):
    """Configuration is invalid: ``problems`` lists every problem found, each with its path."""

    def __init__(self, problems: str | Sequence[object]) -> None:
        self.problems = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:  # one per line: the CLI prints "configuration error: <this>"
            super().__init__(f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems))


class FieldProblem(ValueError):
    """Raised by a model's cross-field check to name the fields at fault (not the model):
    ``errors`` maps each field to its problem."""

    def __init__(self, errors: Mapping[Any, str]) -> None:  # keys: str, or int for an item
        self.errors = dict(errors)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.errors.items()))


def parse_duration(value: object, *, name: str = "duration") -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"24h"`` or ``"2d"``."""
    try:
        return seconds_of(value)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def seconds_of(value: object) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``...; ValueError saying what was expected."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration such as '30s' or '24h', got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("must not be a negative duration")
    return seconds


def _bytes(value: object) -> int:
    """Bytes from ``1048576``, ``"512MB"``, ``"10GB"`` or ``"1GiB"`` (kB, MB... are powers of
    1000, KiB, MiB... of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '10GB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"expected a size such as '512MB' or '10GB', got {value!r}")
        unit = (m.group(2) or "").lower().removesuffix("b")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError("must not be a negative size")
    return size


def _ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable ASCII characters, no backslash")
    return value


def _networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for network in value:
        try:
            ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not a network") from None
    return value


def _folder(value: Path) -> Path:
    if not value.is_absolute() or ".." in value.parts or value == Path(value.anchor):
        raise ValueError(f"{str(value)!r} must be an absolute folder path, not the root, "
                         "without '..'")
    return value


# -- metadata pydantic reads when it validates (it is imported only then) ---------------------


class Before:
    """Run ``func`` on the value before pydantic's own conversion (pydantic's BeforeValidator)."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self.func, handler(source))


class After(Before):
    """Run ``func`` on the converted value (pydantic's AfterValidator)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.func, handler(source))


class JsonSchema:
    """The field's JSON Schema in the OpenAPI document, given rather than derived."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        return dict(self.schema)


class Doc:
    """The field's description in the OpenAPI document (API bodies made from the class)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = dict(handler(core_schema))
        schema["description"] = self.text
        return schema


class Plain:
    """Validate with ``func`` alone (pydantic's PlainValidator): for a value whose own class
    checks it, such as a rule's condition; give its JSON Schema with :class:`JsonSchema`."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(self.func)


def docs_of(model: Any) -> dict[str, str]:
    """Field -> its :class:`Doc` text, for a config class (the forms' help texts)."""
    return {name: item.text for name, info in _fields(model).items()
            for item in info.metadata if isinstance(item, Doc)}


def secrets_of(model: Any) -> frozenset[str]:
    """The fields of a config class marked :class:`WriteOnly` (secrets)."""
    return frozenset(name for name in _fields(model)
                     if any(isinstance(item, WriteOnly)
                            for item in metadata_of(field_type(model, name))))


class WriteOnly:
    """A secret: marked writeOnly in the OpenAPI document, shown only as set / not set."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = dict(handler(core_schema))
        schema["writeOnly"] = True
        return schema


class Strict:
    """No conversion: TOML and JSON have real types, so "104" is not a port and 1 is not true
    (pydantic's Strict, for a whole class's fields being unavailable to a class that is not
    pydantic's own)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        if schema.get("type") in ("int", "bool", "float", "str"):
            return {**schema, "strict": True}
        return schema


def ints(lo: int, hi: int) -> at.Interval:
    """A range, ``lo`` and ``hi`` included."""
    return at.Interval(ge=lo, le=hi)


# The JSON Schema of a duration: a number of seconds or text such as "30s".
DurationSchema = JsonSchema({"anyOf": [
    {"type": "number", "minimum": 0},
    {"type": "string", "pattern": _DURATION.pattern, "description": "e.g. 30s, 5m, 24h, 2d"}]})

# Seconds, written as a number or a duration such as "30s", "5m", "24h" or "2d".
Duration = Annotated[float, Before(seconds_of), DurationSchema]
# Bytes, written as a number or a size such as "512MB", "10GB" or "1GiB".
ByteSize = Annotated[int, Before(_bytes), JsonSchema({"anyOf": [
    {"type": "integer", "minimum": 0},
    {"type": "string", "pattern": _SIZE.pattern, "description": "e.g. 512MB, 10GB, 1GiB"}]})]
# 1-16 printable ASCII characters without backslash, not only spaces; kept as written.
AETitle = Annotated[str, After(_ae_title)]
# CIDR networks (host bits allowed), e.g. ["10.0.0.0/8", "192.0.2.7"].
Networks = Annotated[tuple[str, ...], After(_networks)]
# A path; "~" is the service user's home.
UserPath = Annotated[Path, After(Path.expanduser)]
# An absolute folder other than the root, without "..".
Folder = Annotated[Path, After(Path.expanduser), After(_folder)]
# The port of a peer we connect to.
PeerPort = Annotated[int, Strict(), ints(1, 65535)]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
# Deliveries to one destination at once.
Concurrency = Annotated[int, Strict(), ints(1, MAX_CONCURRENCY),
                        Doc(f"deliveries at once, 1-{MAX_CONCURRENCY}")]
# Free text shown with a destination, rule or remote node.
Description = Annotated[str, at.MaxLen(MAX_DESCRIPTION)]
# Names of transforms (router.transforms) applied to what a destination receives, in order.
TransformNames = Annotated[tuple[Annotated[str, at.MinLen(1), at.MaxLen(64)], ...], Doc(
    "transform names, applied in order to each copy sent (see Transforms)")]
# A destination's name: what rules, the API's URLs and the events call it.
DESTINATION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _destination_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("required: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not DESTINATION_NAME.match(value):
        raise ValueError("invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)")
    return value


DestinationName = Annotated[str, Before(_destination_name), JsonSchema({
    "type": "string", "pattern": DESTINATION_NAME.pattern}), Doc(
    "unique, 1-64 characters of A-Z a-z 0-9 _ . -; what rules call it")]
# Unknown keys are errors (a config class's ``__pydantic_config__``).
SECTION: dict[str, Any] = {"extra": "forbid"}
# Destinations and remote nodes come from TOML and JSON, which have real types: "104" is not
# a port there (only the environment's text is converted, for settings). Their numbers and
# booleans are StrictInt / StrictBool / PeerPort / Concurrency (a class-wide strict mode would
# refuse the keyword arguments they are validated from).
STRICT: dict[str, Any] = {"extra": "forbid"}


_ADAPTERS: dict[Any, Any] = {}


def adapter(model: Any) -> Any:
    """pydantic's TypeAdapter for a config class (made once, on first use)."""
    found = _ADAPTERS.get(model)
    if found is None:
        from pydantic import TypeAdapter

        found = _ADAPTERS[model] = TypeAdapter(model)
    return found


def validated(model: type[T], data: Mapping[str, Any]) -> T:
    """An instance of ``model`` from TOML/JSON-shaped ``data``; pydantic's ValidationError
    (give it to :func:`problems_of`) when anything is wrong."""
    return typing.cast(T, adapter(model).validate_python(dict(data)))


def validation_error() -> type[ValidationError]:
    """pydantic's ValidationError class, for ``except`` clauses (imports pydantic)."""
    from pydantic import ValidationError

    return ValidationError


# -- one error format ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where (``rules[0].match[1].op``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def join_path(prefix: str, *parts: str | int) -> str:
    """``dicom`` + ``max_associations`` -> ``dicom.max_associations``; ints as ``[i]``."""
    path = prefix
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def did_you_mean(key: str, known: Sequence[str]) -> str:
    """``unknown key (did you mean 'x'?)``, or the keys there are when none is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (expected one of {', '.join(sorted(known))})"


def problems_of(exc: ValidationError, root: Any, prefix: str = "") -> list[Problem]:
    """Every error of ``exc`` (from validating ``root``) as a :class:`Problem` under ``prefix``."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            message = did_you_mean(str(loc[-1]), config_keys(root, loc[:-1]))
        elif kind == "value_error" and isinstance(getattr(ctx.get("error"), "errors", None),
                                                  Mapping):  # a FieldProblem or the like
            problems += [Problem(join_path(prefix, *loc, *([key] if key != "" else [])),
                                 message) for key, message in ctx["error"].errors.items()]
            continue
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            message = _range(_bounds(root, loc) or ctx, error.get("input"))
        else:
            message = _message(kind, error["msg"], ctx, error.get("input"))
            if kind == "literal_error":
                message += _closest_choice(root, loc, error.get("input"))
        problems.append(Problem(join_path(prefix, *loc), message))
    return problems


def _closest_choice(root: Any, loc: Sequence[str | int], given: object) -> str:
    """`` (did you mean 'dicom'?)`` for a mistyped choice of a Literal field, else ""."""
    hint = unwrapped(_walk(root, loc)[0])
    if typing.get_origin(hint) is not typing.Literal or not isinstance(given, str):
        return ""
    close = difflib.get_close_matches(given, [str(a) for a in typing.get_args(hint)], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(kind: str, msg: str, ctx: Mapping[str, Any], given: object) -> str:
    """Words for one pydantic error; values are echoed only for non-text types (never a
    secret: a secret is text, and a text field's problems do not repeat the text)."""
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return "required"
    if kind == "value_error":
        return str(ctx.get("error", msg.removeprefix("Value error, ")))
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_shown(given)}"
    if kind.startswith(("int_", "bool_", "float_", "tuple_", "list_")):
        expected = {"int": "a whole number", "bool": "true or false", "float": "a number",
                    "tuple": "a list", "list": "a list"}[kind.split("_")[0]]
        return f"expected {expected}, got {_shown(given)}"
    if kind == "string_type":
        return f"expected a string, got {type(given).__name__}"
    if kind in ("dataclass_type", "dataclass_args_type", "model_type", "dict_type"):
        return f"expected a table, got {type(given).__name__}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "string_too_short":
        least = ctx["min_length"]
        return "must not be empty" if least == 1 else f"must be at least {least} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} item(s)"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    return msg.replace("Input should be", "must be")


def config_keys(root: Any, loc: Sequence[str | int] = ()) -> list[str]:
    """The keys a table at ``loc`` below the model ``root`` accepts (names and aliases)."""
    model = unwrapped(_walk(root, loc)[0])
    keys = [*aliases_of(model)]
    keys += [name for name in _fields(model) if name not in keys]
    return keys


def aliases_of(model: Any) -> dict[str, str]:
    """Other names a config class accepts for its fields (``__config_aliases__``: alias ->
    field), e.g. ``retry_every`` for ``retry_every_after``."""
    return dict(getattr(model, "__config_aliases__", {}))


@dataclass(frozen=True)
class _Field:
    annotation: Any
    metadata: tuple[Any, ...]


def _walk(root: Any, loc: Sequence[str | int]) -> tuple[Any, _Field | None]:
    """The type at ``loc`` below ``root``, and the field it is (None for list items)."""
    model, info = root, None
    for part in loc:
        model = unwrapped(model)
        if isinstance(part, int):
            args = [a for a in typing.get_args(model) if a is not Ellipsis]
            model, info = (args[0] if args else None), None
        else:
            info = _fields(model).get(part)
            model = info.annotation if info is not None else None
    return model, info


def _bounds(root: Any, loc: Sequence[str | int]) -> dict[str, Any]:
    """The ge/gt/le/lt constraints of the field at ``loc``, or of the annotated type there
    (a list's item, a value validated on its own); empty when unknown."""
    hint, info = _walk(root, loc)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = others[0] if len(others) == 1 else None  # X | None: X's own bounds
    bounds: dict[str, Any] = {}
    for item in (info.metadata if info is not None else ()) + metadata_of(hint):
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    return bounds


def _range(bounds: Mapping[str, Any], given: object) -> str:
    """``must be between 1 and 65535, got 0`` and the like, from both ends of a range."""
    low = (f"at least {bounds['ge']}" if "ge" in bounds
           else f"more than {bounds['gt']}" if "gt" in bounds else None)
    high = (f"at most {bounds['le']}" if "le" in bounds
            else f"less than {bounds['lt']}" if "lt" in bounds else None)
    if "ge" in bounds and "le" in bounds:
        return f"must be between {bounds['ge']} and {bounds['le']}, got {_shown(given)}"
    return f"must be {' and '.join(t for t in (low, high) if t)}, got {_shown(given)}"


def metadata_of(hint: Any) -> tuple[Any, ...]:
    """The metadata of ``Annotated[X, ...]`` (nested ones flattened); () for other types."""
    metadata: tuple[Any, ...] = ()
    while typing.get_origin(hint) is Annotated:
        metadata += tuple(hint.__metadata__)
        hint = typing.get_args(hint)[0]
    return metadata


def field_type(model: Any, key: str) -> Any:
    """A config class's field as one annotated type (``Annotated[int, Interval(...), Doc]``):
    validated on its own with :func:`adapter`, or a body's field (a runtime setting)."""
    info = _fields(model)[key]
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def unwrapped(hint: Any) -> Any:
    """``X`` from ``Annotated[X, ...]`` and ``X | None``."""
    while True:
        if typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
        elif isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint
            hint = args[0]
        else:
            return hint


def _fields(model: Any) -> dict[str, Any]:
    """Field name -> its type and metadata, for a config dataclass or a pydantic model."""
    if isinstance(model, type) and hasattr(model, "model_fields"):  # a pydantic BaseModel
        return {name: _Field(info.annotation, tuple(info.metadata))
                for name, info in model.model_fields.items()}
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model, include_extras=True)
        out = {}
        for spec in dataclasses.fields(model):
            if not spec.init:  # worked out from the others (a rule's compiled patterns)
                continue
            hint = hints[spec.name]
            metadata: tuple[Any, ...] = ()
            while typing.get_origin(hint) is Annotated:
                metadata += tuple(hint.__metadata__)
                hint = typing.get_args(hint)[0]
            out[spec.name] = _Field(hint, metadata)
        return out
    return {}
