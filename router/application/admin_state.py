"""The current rules, destinations and user accounts, kept in memory by following the admin log.

The admin log is small (configuration changes), so it is replayed from the start when the
router starts and then followed; the routing path reads a consistent snapshot without I/O.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from router.domain import admin, users
from router.domain.rules import VersionedRule, stored_rule
from router.transforms.chain import VersionedTransform
from router.transforms.spec import parse_transform


@dataclass(frozen=True)
class DestinationState:
    """A destination as the dispatcher sees it: sealed config, version, pause flag."""

    name: str
    destination_id: str
    version: int
    config: dict[str, Any]
    paused: bool
    deleted: bool
    detached: bool = False  # detached from the TOML file: the file no longer changes it


@dataclass(frozen=True)
class UserState:
    """A user account as logins and permission checks see it."""

    name: str
    role: str
    disabled: bool
    password_hash: str
    version: int
    tokens: dict[str, dict[str, Any]]
    times_disabled: int = 0
    unlocked_at: float = 0.0  # the last User.Unlocked (Unix seconds); 0: never

    @property
    def credentials_tag(self) -> str:
        """Changes when the password changes or the user is disabled: sessions carry it, so
        they die with the old password and are not revived when the user is enabled again."""
        text = f"{self.password_hash}:{self.times_disabled}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AdminSnapshot:
    """Rules (enabled or not, in priority order) and destinations at one admin log position."""

    position: int = 0
    rules: tuple[VersionedRule, ...] = ()
    destinations: dict[str, DestinationState] = field(default_factory=dict)
    users: dict[str, UserState] = field(default_factory=dict)  # by lower-case name
    detached_rules: frozenset[str] = frozenset()  # names of rules detached from the file
    transforms: dict[str, VersionedTransform] = field(default_factory=dict)  # live ones

    def live_destinations(self) -> dict[str, DestinationState]:
        return {n: d for n, d in self.destinations.items() if not d.deleted}


class AdminState:
    """Follows the admin application; :meth:`snapshot` is cheap and thread-safe."""

    def __init__(self, app: Any, refresh_interval: float = 1.0) -> None:
        self._app = app
        self._interval = refresh_interval
        self._lock = threading.Lock()
        self._rules: dict[str, Any] = {}
        self._destinations: dict[str, Any] = {}
        self._users: dict[str, Any] = {}
        self._transforms: dict[str, Any] = {}
        self._snapshot = AdminSnapshot()
        self._checked = 0.0
        self.refresh()

    def snapshot(self) -> AdminSnapshot:
        if time.monotonic() - self._checked > self._interval:
            self.refresh()
        return self._snapshot

    def refresh(self) -> AdminSnapshot:
        """Apply admin events recorded since the last refresh (by any node)."""
        with self._lock:
            self._checked = time.monotonic()
            position = self._snapshot.position
            changed = False
            while True:
                batch = self._app.recorder.select_notifications(
                    start=position, limit=500, inclusive_of_start=False
                )
                if not batch:
                    break
                for notification in batch:
                    event = self._app.mapper.to_domain_event(notification)
                    self._remember(event.originator_id)
                    position = notification.id
                changed = True
            if changed:
                self._snapshot = self._build(position)
            return self._snapshot

    def _remember(self, originator_id: Any) -> None:
        aggregate = self._app.repository.get(originator_id)
        if isinstance(aggregate, admin.Rule):
            self._rules[str(aggregate.id)] = aggregate
        elif isinstance(aggregate, admin.Destination):
            self._destinations[aggregate.name] = aggregate
        elif isinstance(aggregate, users.User):
            self._users[aggregate.name.lower()] = aggregate
        elif isinstance(aggregate, admin.Transform):
            self._transforms[aggregate.name] = aggregate

    def _build(self, position: int) -> AdminSnapshot:
        rules = [
            VersionedRule(rule_id=rid, version=r.version, spec=stored_rule(r.spec))
            for rid, r in self._rules.items()
            if not r.deleted
        ]
        rules.sort(key=lambda r: (r.spec.priority, r.spec.name))
        destinations = {
            name: DestinationState(
                name=name, destination_id=str(d.id), version=d.version, config=d.config,
                paused=d.paused, deleted=d.deleted, detached=getattr(d, "detached", False),
            )
            for name, d in self._destinations.items()
        }
        accounts = {
            key: UserState(name=u.name, role=u.role, disabled=u.disabled,
                           password_hash=u.password_hash, version=u.version,
                           tokens={k: dict(v) for k, v in u.tokens.items()},
                           times_disabled=getattr(u, "times_disabled", 0),
                           unlocked_at=getattr(u, "unlocked_at", 0.0))
            for key, u in self._users.items()
        }
        detached = frozenset(r.name for r in self._rules.values()
                             if getattr(r, "detached", False))
        transforms = {name: VersionedTransform(t.version, parse_transform(t.spec))
                      for name, t in self._transforms.items() if not t.deleted}
        return AdminSnapshot(position=position, rules=tuple(rules), destinations=destinations,
                             users=accounts, detached_rules=detached, transforms=transforms)
