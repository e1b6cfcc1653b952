"""Rules, destinations and user accounts as they were at a chosen time, rebuilt by replaying
the admin events recorded up to then (timestamp <= T).

Pure read of the admin log: nothing is saved. Destination secrets are masked; password and
token hashes are never copied out of the replayed aggregates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from router.dispatch.registry import MASK, public_config
from router.domain import admin, remote, runtime_settings, users
from router.secrets import SecretBox

PAGE = 500


@dataclass(frozen=True)
class Change:
    """The last change of an item before T: when, by whom, from where."""

    at: float
    actor: str
    source_ip: str


@dataclass(frozen=True)
class RuleAsOf:
    rule_id: str
    name: str
    version: int
    spec: dict[str, Any]
    deleted: bool
    created: Change
    changed: Change


@dataclass(frozen=True)
class DestinationAsOf:
    destination_id: str
    name: str
    version: int
    type: str
    config: dict[str, Any]  # secret fields masked
    paused: bool
    deleted: bool
    created: Change
    changed: Change


@dataclass(frozen=True)
class RemoteNodeAsOf:
    node_id: str
    name: str
    version: int
    config: dict[str, Any]  # AE title, host, port, services (anything sealed masked)
    deleted: bool
    created: Change
    changed: Change


@dataclass(frozen=True)
class TokenAsOf:
    token_id: str
    label: str
    revoked: bool


@dataclass(frozen=True)
class UserAsOf:
    user_id: str
    name: str
    role: str
    disabled: bool
    tokens: tuple[TokenAsOf, ...]
    version: int
    created: Change
    changed: Change


@dataclass(frozen=True)
class StateAsOf:
    """The admin state at ``at`` (Unix seconds, UTC), after ``events`` admin events."""

    at: float
    events: int
    rules: tuple[RuleAsOf, ...]
    destinations: tuple[DestinationAsOf, ...]
    users: tuple[UserAsOf, ...]
    settings: dict[str, Any]  # run-time overrides of the configuration file
    remote_nodes: tuple[RemoteNodeAsOf, ...] = ()


def _admin_events(app: Any) -> Iterator[Any]:
    """Every admin event, in the order recorded."""
    position = 0
    while True:
        batch = app.recorder.select_notifications(start=position, limit=PAGE,
                                                  inclusive_of_start=False)
        if not batch:
            return
        for notification in batch:
            yield app.mapper.to_domain_event(notification)
        position = batch[-1].id


def _change(event: Any) -> Change:
    return Change(at=event.timestamp.timestamp(), actor=str(getattr(event, "actor", "")),
                  source_ip=str(getattr(event, "source_ip", "")))


def replay(app: Any, at: float) -> tuple[dict[UUID, Any], dict[UUID, tuple[Change, Change]],
                                         int]:
    """The admin aggregates as of ``at``, with their first and last change, and the count.

    An aggregate stops at its first event after ``at``: with several nodes the log order and
    the clocks may disagree slightly, and a later version cannot apply without the one before.
    """
    limit = datetime.fromtimestamp(at, UTC)
    aggregates: dict[UUID, Any] = {}
    changes: dict[UUID, tuple[Change, Change]] = {}
    stopped: set[UUID] = set()
    count = 0
    for event in _admin_events(app):
        oid = event.originator_id
        if oid in stopped:
            continue
        if event.timestamp > limit:
            stopped.add(oid)
            continue
        aggregates[oid] = event.mutate(aggregates.get(oid))
        change = _change(event)
        changes[oid] = (changes[oid][0] if oid in changes else change, change)
        count += 1
    return aggregates, changes, count


def state_as_of(app: Any, at: float) -> StateAsOf:
    """Rules (by priority), destinations and users (by name) as they were at ``at``."""
    aggregates, changes, count = replay(app, at)
    rules, destinations, accounts, nodes = [], [], [], []
    overrides: dict[str, Any] = {}
    for oid, aggregate in aggregates.items():
        created, changed = changes[oid]
        if isinstance(aggregate, admin.Rule):
            rules.append(_rule(aggregate, created, changed))
        elif isinstance(aggregate, admin.Destination):
            destinations.append(_destination(aggregate, created, changed))
        elif isinstance(aggregate, users.User):
            accounts.append(_user(aggregate, created, changed))
        elif isinstance(aggregate, remote.RemoteNode):
            nodes.append(_remote_node(aggregate, created, changed))
        elif isinstance(aggregate, runtime_settings.RuntimeSettings):
            overrides = dict(sorted(aggregate.values.items()))
    rules.sort(key=lambda r: (r.deleted, int(r.spec.get("priority", 100)), r.name))
    destinations.sort(key=lambda d: (d.deleted, d.name))
    accounts.sort(key=lambda u: u.name.lower())
    nodes.sort(key=lambda n: (n.deleted, n.name))
    return StateAsOf(at=at, events=count, rules=tuple(rules),
                     destinations=tuple(destinations), users=tuple(accounts),
                     settings=overrides, remote_nodes=tuple(nodes))


def _rule(rule: admin.Rule, created: Change, changed: Change) -> RuleAsOf:
    return RuleAsOf(rule_id=str(rule.id), name=rule.name, version=rule.version,
                    spec=dict(rule.spec), deleted=rule.deleted, created=created,
                    changed=changed)


def _destination(dest: admin.Destination, created: Change, changed: Change) -> DestinationAsOf:
    return DestinationAsOf(destination_id=str(dest.id), name=dest.name, version=dest.version,
                           type=str(dest.config.get("type", "")),
                           config=public_config(dest.config), paused=dest.paused,
                           deleted=dest.deleted, created=created, changed=changed)


def _user(user: users.User, created: Change, changed: Change) -> UserAsOf:
    tokens = tuple(TokenAsOf(token_id=token_id, label=str(token.get("label", "")),
                             revoked=bool(token.get("revoked")))
                   for token_id, token in sorted(user.tokens.items()))
    return UserAsOf(user_id=str(user.id), name=user.name, role=user.role,
                    disabled=user.disabled, tokens=tokens,
                    version=user.version, created=created, changed=changed)


def _remote_node(node: remote.RemoteNode, created: Change, changed: Change) -> RemoteNodeAsOf:
    config = {key: MASK if SecretBox.is_sealed(value) else value
              for key, value in node.config.items()}
    return RemoteNodeAsOf(node_id=str(node.id), name=node.name, version=node.version,
                          config=config,
                          deleted=node.deleted, created=created, changed=changed)
