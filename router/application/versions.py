"""Every version of one rule, destination, user account or remote node, rebuilt from its
events in the admin log, and what changed between two of them (field by field).

Pure read of the admin log, like "state as of" (history.py): destination secrets are masked,
password and token hashes are never copied out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from router.dispatch.registry import MASK, public_config
from router.domain import admin, remote, users
from router.secrets import SecretBox

MAX_VERSIONS = 1000  # a longer history is shown up to this version


@dataclass(frozen=True)
class Version:
    """One version: the event that made it, when, by whom, and the fields as they then were."""

    version: int
    event: str  # e.g. "Rule.Updated"
    at: float
    actor: str
    source_ip: str
    kind: str  # "rule", "destination", "user", "remote node"
    name: str
    fields: dict[str, str]  # field -> value as text


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def history(app: Any, object_id: UUID) -> list[Version]:
    """The versions of one admin aggregate, oldest first (empty when there is none)."""
    versions: list[Version] = []
    aggregate: Any = None
    for event in app.events.get(object_id, limit=MAX_VERSIONS):
        aggregate = event.mutate(aggregate)
        kind, fields = describe(aggregate)
        if not kind:
            return []
        versions.append(Version(
            version=int(event.originator_version),
            event=f"{type(aggregate).__name__}.{type(event).__name__}",
            at=event.timestamp.timestamp(), actor=str(getattr(event, "actor", "")),
            source_ip=str(getattr(event, "source_ip", "")), kind=kind,
            name=str(getattr(aggregate, "name", "")), fields=fields))
    return versions


def compare(before: Version | None, after: Version) -> list[FieldChange]:
    """Every field of either version, side by side (a field missing from one is empty)."""
    old = before.fields if before is not None else {}
    keys = list(dict.fromkeys([*old, *after.fields]))
    return [FieldChange(key, old.get(key, ""), after.fields.get(key, "")) for key in keys]


def changes_at(app: Any, object_id: UUID, version: int) -> list[FieldChange]:
    """What the event that made ``version`` changed (only the fields that differ)."""
    versions = {v.version: v for v in history(app, object_id)}
    if version not in versions:
        return []
    return [c for c in compare(versions.get(version - 1), versions[version]) if c.changed]


def describe(aggregate: Any) -> tuple[str, dict[str, str]]:
    """The kind and the shown fields of an admin aggregate ("" for other aggregates)."""
    if isinstance(aggregate, admin.Rule):
        spec = dict(aggregate.spec)
        if isinstance(spec.get("match"), list):
            spec["match"] = [_condition(c) for c in spec["match"]]
        return "rule", _texts({**spec, "deleted": aggregate.deleted})
    if isinstance(aggregate, admin.Destination):
        return "destination", _texts({**public_config(aggregate.config),
                                      "paused": aggregate.paused, "deleted": aggregate.deleted})
    if isinstance(aggregate, users.User):
        tokens = sorted(f"{t.get('label', '')} ({token_id}){' revoked' if t.get('revoked') else ''}"
                        for token_id, t in aggregate.tokens.items())
        return "user", _texts({"name": aggregate.name, "role": aggregate.role,
                               "disabled": aggregate.disabled, "api_tokens": tokens})
    if isinstance(aggregate, remote.RemoteNode):
        config = {key: MASK if SecretBox.is_sealed(value) else value
                  for key, value in aggregate.config.items()}
        return "remote node", _texts({"name": aggregate.name, **config,
                                      "deleted": aggregate.deleted})
    return "", {}


def _condition(condition: Any) -> Any:
    """A rule condition as people write it: ``BodyPartExamined eq "CHEST"``."""
    if not isinstance(condition, dict) or "tag" not in condition:
        return condition
    value = condition.get("value")
    shown = "" if value is None and condition.get("op") == "exists" else \
        " " + json.dumps(value, ensure_ascii=False)
    return f"{condition['tag']} {condition.get('op', '')}{shown}"


def _texts(values: dict[str, Any]) -> dict[str, str]:
    return {key: text(value) for key, value in values.items()}


def text(value: Any) -> str:
    """A field's value as text: lists one item a line, yes/no, JSON for structures."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return "\n".join(text(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)
