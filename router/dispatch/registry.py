"""The explicit table of destination kinds, and parsing, sealing and building of destinations.

A destination is stored as a JSON-safe dict (``seal_config``) whose secret fields are sealed
with the :class:`~router.secrets.SecretBox`; ``build_adapter`` turns such a dict into an adapter
held to the :class:`~router.dispatch.policy.DestinationPolicy` (addresses and folders).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from router.config_types import DESTINATION_NAME as DESTINATION_NAME  # re-exported
from router.config_types import (
    Before,
    DestinationName,
    JsonSchema,
    problems_of,
    validated,
    validation_error,
)
from router.dispatch.ai import AIAdapter, AIDestinationConfig
from router.dispatch.base import Adapter
from router.dispatch.dicom import DicomAdapter, DicomDestinationConfig
from router.dispatch.file import FileAdapter, FileDestinationConfig
from router.dispatch.policy import DestinationPolicy
from router.dispatch.s3 import S3Adapter, S3DestinationConfig
from router.secrets import SecretBox, SecretError

DestinationConfig = (DicomDestinationConfig | FileDestinationConfig | S3DestinationConfig
                     | AIDestinationConfig)

MASK = "********"


class DestinationConfigError(ValueError):
    """A destination's settings are invalid; ``errors`` maps each bad field to a message."""

    def __init__(self, name: str | None, errors: Mapping[str, str]) -> None:
        self.name = name
        self.errors: dict[str, str] = dict(errors)
        listed = "; ".join(f"{key}: {message}" for key, message in self.errors.items())
        super().__init__(f"destination {name or '(unnamed)'!r}: {listed}")


@dataclass(frozen=True)
class DestinationKind:
    """One destination type: its config class, adapter class and secret (sealed) fields."""

    name: str
    config_class: type[Any]
    adapter_class: type[Any]
    secret_fields: frozenset[str]
    build: Callable[[Any, str, DestinationPolicy], Adapter]


DESTINATION_KINDS: dict[str, DestinationKind] = {
    "dicom": DestinationKind(
        "dicom",
        DicomDestinationConfig,
        DicomAdapter,
        frozenset(),
        lambda config, calling_ae, policy: DicomAdapter(config, calling_ae=calling_ae,
                                                        policy=policy.addresses),
    ),
    "file": DestinationKind(
        "file", FileDestinationConfig, FileAdapter, frozenset(),
        lambda config, _, policy: FileAdapter(config, policy=policy.folders),
    ),
    "s3": DestinationKind(
        "s3",
        S3DestinationConfig,
        S3Adapter,
        frozenset({"secret_access_key", "session_token"}),
        lambda config, _, policy: S3Adapter(config, policy=policy.addresses),
    ),
    # Requests are made per series or study by router.ai.worker; the adapter only checks.
    "ai": DestinationKind(
        "ai", AIDestinationConfig, AIAdapter, frozenset({"secret"}),
        lambda config, _, policy: AIAdapter(config, policy=policy.ai_addresses),
    ),
}


def _destination_type(value: object) -> str:
    kinds = sorted(DESTINATION_KINDS)
    if value is None:
        raise ValueError(f"required: one of {', '.join(kinds)}")
    if isinstance(value, str) and value in DESTINATION_KINDS:
        return value
    close = difflib.get_close_matches(value, kinds, n=1) if isinstance(value, str) else []
    hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(kinds)}"
    raise ValueError(f"unknown type {value!r}; {hint}")


@dataclass(frozen=True)
class DestinationHead:
    """What every destination has whatever its kind, judged alone when its ``type`` names no
    kind (the kind's class then cannot say which other keys belong)."""

    __pydantic_config__ = {"extra": "ignore", "validate_default": True}

    name: DestinationName
    type: Annotated[str | None, Before(_destination_type), JsonSchema({
        "enum": sorted(DESTINATION_KINDS), "description": "the kind of destination"})] = None


def parse_destination(data: Mapping[str, object]) -> DestinationConfig:
    """A validated config from TOML/JSON-shaped ``data`` (plaintext or sealed secrets).

    The kind's config class (validated by pydantic) checks keys, types and ranges, the name
    included; its ``problems()`` then checks what needs several fields or the file system's
    rules. Without a known ``type`` only the name and the type are judged
    (:class:`DestinationHead`). Raises :class:`DestinationConfigError` listing every problem
    found, each under its field.
    """
    if not isinstance(data, Mapping):
        raise DestinationConfigError(None, {"destination": "must be a table / object"})
    name = data.get("name")
    shown_name = name if isinstance(name, str) else None
    type_name = data.get("type")
    kind = DESTINATION_KINDS.get(type_name) if isinstance(type_name, str) else None
    # A missing name goes through the name's own check too, which says what a name is.
    values = {"name": None, **{str(key): value for key, value in data.items() if key != "type"}}
    if kind is None:
        try:
            validated(DestinationHead, {**values, "type": type_name})
        except validation_error() as exc:
            raise DestinationConfigError(shown_name, {
                p.path: p.message for p in problems_of(exc, DestinationHead)}) from None
        raise AssertionError("a type that names no kind passed")  # pragma: no cover
    try:
        config = validated(kind.config_class, values)
        errors: dict[str, str] = {}
    except validation_error() as exc:
        errors = {p.path: p.message.replace(
            "unknown key", f"unknown key for a {kind.name} destination", 1)
            for p in problems_of(exc, kind.config_class)}
        if set(errors) != {"name"}:
            raise DestinationConfigError(shown_name, errors) from None
        # Only the name is wrong: what needs several fields is judged too.
        config = validated(kind.config_class, {**values, "name": "unnamed"})
    errors.update(_mask_problems(config, kind))
    errors.update(config.problems())
    if errors:
        raise DestinationConfigError(shown_name, errors)
    return typing.cast(DestinationConfig, config)


def _mask_problems(config: Any, kind: DestinationKind) -> dict[str, str]:
    return {key: "is the display mask, not a secret: enter the secret again"
            for key in sorted(kind.secret_fields) if getattr(config, key) == MASK}


def seal_config(config: DestinationConfig, box: SecretBox) -> dict[str, object]:
    """The JSON-safe dict to store: ``name``, ``type``, every set field, secrets sealed.

    A secret that is already sealed is kept as is after checking it opens for this
    destination and field (sealed values are bound to both).
    """
    kind = kind_of(config)
    stored: dict[str, object] = {"name": config.name, "type": kind.name}
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if spec.name == "name" or value is None:
            continue
        if spec.name == "transforms":
            if not value:  # left out: destinations stored before transforms compare equal
                continue
            value = list(value)
        if spec.name in kind.secret_fields:
            value = _sealed(box, config.name, spec.name, str(value))
        stored[spec.name] = value
    return stored


def _sealed(box: SecretBox, name: str, key: str, value: str) -> str:
    context = secret_context(name, key)
    if not SecretBox.is_sealed(value):
        return box.seal(value, context=context)
    try:
        box.open(value, context=context)
    except SecretError:
        raise DestinationConfigError(
            name, {key: "sealed value does not belong to this destination: enter it again"}
        ) from None
    return value


def secret_context(name: str, key: str) -> str:
    """The associated data a secret of destination ``name``, field ``key`` is sealed with."""
    return f"{name}/{key}"


def public_config(stored: Mapping[str, object]) -> dict[str, object]:
    """A copy for display: secret fields (and anything sealed) replaced by ``********``."""
    kind = DESTINATION_KINDS.get(str(stored.get("type")))
    secret_fields = kind.secret_fields if kind else frozenset()
    return {
        key: MASK if (key in secret_fields and value) or SecretBox.is_sealed(value) else value
        for key, value in stored.items()
    }


def open_config(stored: Mapping[str, object], box: SecretBox) -> dict[str, object]:
    """A copy of a stored dict with its sealed secrets opened (for building or comparing).

    Raises :class:`DestinationConfigError` if a secret does not open with ``box``.
    """
    kind = DESTINATION_KINDS.get(str(stored.get("type")))
    name = str(stored.get("name"))
    opened = dict(stored)
    for key in kind.secret_fields if kind else ():
        value = opened.get(key)
        if SecretBox.is_sealed(value):
            try:
                opened[key] = box.open(str(value), context=secret_context(name, key))
            except SecretError as exc:
                raise DestinationConfigError(name, {key: str(exc)}) from None
    return opened


def build_adapter(stored: Mapping[str, object], box: SecretBox, *, calling_ae: str,
                  policy: DestinationPolicy) -> Adapter:
    """An adapter from a stored (sealed) dict; ``calling_ae`` unless the config sets its own.
    The policy is not checked here (a stored destination may predate it): the adapter checks
    it at every connection or write.

    Raises :class:`DestinationConfigError` if the dict is invalid or a secret cannot be opened.
    """
    config = parse_destination(open_config(stored, box))
    return kind_of(config).build(config, calling_ae, policy)


def check_policy(config: DestinationConfig, policy: DestinationPolicy) -> None:
    """Raise :class:`DestinationConfigError` (naming the field) if the policy refuses it."""
    problems = policy.problems(config)
    if problems:
        raise DestinationConfigError(config.name, problems)


def kind_of(config: DestinationConfig) -> DestinationKind:
    """The registered kind whose config class ``config`` is."""
    for kind in DESTINATION_KINDS.values():
        if type(config) is kind.config_class:
            return kind
    raise TypeError(f"not a registered destination config: {type(config).__name__}")
