"""Commands on rules, destinations and deliveries: the layer the CLI uses now and the REST API
will expose. Each command records events with who asked, from where, and a correlation id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.admin_state import AdminState
from router.application.conflicts import save_changed
from router.application.stores import EventStores
from router.dispatch.policy import DestinationPolicy
from router.dispatch.registry import (
    DestinationConfigError,
    check_policy,
    open_config,
    parse_destination,
    seal_config,
)
from router.domain.admin import (
    Destination,
    Rule,
    Transform,
    destination_id,
    rule_id,
    transform_id,
)
from router.domain.delivery import Delivery, delivery_id
from router.domain.rules import RuleError, parse_rule
from router.secrets import SecretBox
from router.transforms.spec import TransformError, parse_transform


class CommandError(ValueError):
    """A command cannot be carried out; the message says why (shown to the user)."""


class NotFoundError(CommandError):
    """The named rule, destination or delivery does not exist."""


@dataclass(frozen=True)
class Actor:
    """Who asks, from where, under which correlation id."""

    name: str
    source_ip: str = ""
    correlation_id: str = ""

    def ctx(self) -> dict[str, str]:
        return {"actor": self.name, "source_ip": self.source_ip,
                "correlation_id": self.correlation_id or str(uuid.uuid4())}


CONFIG_ACTOR = Actor("config")


class Commands:
    """Write-side commands. Thread-safe as far as the event store is (optimistic locking)."""

    def __init__(self, stores: EventStores, admin_state: AdminState, box: SecretBox,
                 policy: DestinationPolicy) -> None:
        self._stores = stores
        self._admin = admin_state
        self._box = box
        self._policy = policy

    # --- destinations ---------------------------------------------------------------
    def put_destination(self, data: Mapping[str, Any], actor: Actor) -> bool:
        """Create or replace a destination; False when nothing changed. Refused (with the
        field and the reason) when the destination policy does not allow it."""
        config = parse_destination(data)
        check_policy(config, self._policy)
        name = str(data["name"])
        missing = self._unknown_transforms(getattr(config, "transforms", ()))
        if missing:
            raise DestinationConfigError(name, {"transforms": "unknown transform(s): "
                                                              + ", ".join(missing)})
        existing = self._get(Destination, destination_id(name))
        if existing is not None and not existing.deleted and self._same_destination(
            existing.config, config
        ):
            return False
        sealed = seal_config(config, self._box)
        if existing is None:
            aggregate = Destination(name, **actor.ctx(), config=sealed)
        else:
            existing.update(**actor.ctx(), config=sealed)
            aggregate = existing
        self._save_admin(aggregate)
        return True

    def _same_destination(self, stored: Mapping[str, Any], config: Any) -> bool:
        # Sealed values use random nonces: compare the opened values, not the ciphertexts.
        return open_config(seal_config(config, self._box), self._box) == open_config(
            stored, self._box)

    def delete_destination(self, name: str, actor: Actor) -> None:
        aggregate = self._require(Destination, destination_id(name), f"destination {name!r}")
        if not aggregate.deleted:
            aggregate.delete(**actor.ctx())
            self._save_admin(aggregate)

    def pause_destination(self, name: str, actor: Actor, paused: bool = True) -> None:
        aggregate = self._require(Destination, destination_id(name), f"destination {name!r}")
        if aggregate.paused != paused:
            (aggregate.pause if paused else aggregate.resume)(**actor.ctx())
            self._save_admin(aggregate)

    # --- rules ----------------------------------------------------------------------
    def put_rule(self, data: Mapping[str, Any], actor: Actor) -> bool:
        """Create or replace a rule (by name); False when nothing changed."""
        try:
            spec = parse_rule(data)
        except RuleError as exc:
            raise CommandError(str(exc)) from None
        known = self._admin.refresh().live_destinations()
        missing = [d for d in spec.destinations if d not in known]
        if missing:
            raise CommandError(f"rule {spec.name!r}: unknown destination(s): "
                               + ", ".join(sorted(missing)))
        unknown = self._unknown_transforms(spec.transforms)
        if unknown:
            raise CommandError(f"rule {spec.name!r}: transforms: unknown transform(s): "
                               + ", ".join(unknown))
        stored = spec.to_dict()
        existing = self._get(Rule, rule_id(spec.name))
        if existing is not None and not existing.deleted and existing.spec == stored:
            return False
        if existing is None:
            aggregate = Rule(spec.name, **actor.ctx(), spec=stored)
        else:
            existing.update(**actor.ctx(), spec=stored)
            aggregate = existing
        self._save_admin(aggregate)
        return True

    def delete_rule(self, name: str, actor: Actor) -> None:
        aggregate = self._require(Rule, rule_id(name), f"rule {name!r}")
        if not aggregate.deleted:
            aggregate.delete(**actor.ctx())
            self._save_admin(aggregate)

    # --- transforms -----------------------------------------------------------------
    def put_transform(self, data: Mapping[str, Any], actor: Actor) -> bool:
        """Create or replace a transform (by name); False when nothing changed. Raises
        :class:`TransformError` naming each bad field."""
        spec = parse_transform(data)
        stored = spec.to_dict()
        existing = self._get(Transform, transform_id(spec.name))
        if existing is not None and not existing.deleted and existing.spec == stored:
            return False
        if existing is None:
            aggregate = Transform(spec.name, **actor.ctx(), spec=stored)
        else:
            existing.update(**actor.ctx(), spec=stored)
            aggregate = existing
        self._save_admin(aggregate)
        return True

    def delete_transform(self, name: str, actor: Actor) -> None:
        """Refused while a destination or rule names it (their sends would fail)."""
        aggregate = self._require(Transform, transform_id(name), f"transform {name!r}")
        if aggregate.deleted:
            return
        users = self.transform_users(name)
        if users:
            raise CommandError(f"transform {name!r} is used by {', '.join(users)}: remove it "
                               "from them first")
        aggregate.delete(**actor.ctx())
        self._save_admin(aggregate)

    def transform_users(self, name: str) -> list[str]:
        """The destinations and rules that name transform ``name``."""
        snapshot = self._admin.refresh()
        return ([f"destination {d!r}" for d, s in snapshot.live_destinations().items()
                 if name in (s.config.get("transforms") or ())]
                + [f"rule {r.spec.name!r}" for r in snapshot.rules if name in r.spec.transforms])

    def _unknown_transforms(self, names: Sequence[str]) -> list[str]:
        known = self._admin.refresh().transforms
        return sorted(n for n in names if n not in known)

    # --- deliveries -----------------------------------------------------------------
    def requeue(self, job_id: str, destination: str, actor: Actor, reason: str = "") -> None:
        """Attempt again now; a delivery that never ran yet is simply left pending."""
        self._change_delivery(job_id, destination, self._requeuing(actor, reason))

    @staticmethod
    def _requeuing(actor: Actor, reason: str = "") -> Callable[[Any], Any]:
        def change(aggregate: Any) -> Any:
            if aggregate is None:
                return None
            if aggregate.status == "delivered":
                raise CommandError("already delivered; nothing to requeue")
            aggregate.requeue(**actor.ctx(), reason=reason)
            return aggregate
        return change

    def resend(self, job_id: str, destination: str, actor: Actor, reason: str = "") -> bool:
        """Attempt again, a delivered delivery too (a user sends the object again); False
        when it is already waiting for an attempt (pending, or never attempted)."""
        changed: list[bool] = []

        def change(aggregate: Any) -> Any:
            if aggregate is None or aggregate.status == "pending":
                return None
            aggregate.requeue(**actor.ctx(), reason=reason)
            changed.append(True)
            return aggregate
        self._change_delivery(job_id, destination, change)
        return bool(changed)

    def cancel(self, job_id: str, destination: str, actor: Actor, reason: str = "") -> None:
        self._change_delivery(job_id, destination,
                              self._cancelling(job_id, destination, actor, reason))

    @staticmethod
    def _cancelling(job_id: str, destination: str, actor: Actor, reason: str
                    ) -> Callable[[Any], Any]:
        def change(aggregate: Any) -> Any:
            if aggregate is None:
                aggregate = Delivery(job_id, destination, **actor.ctx(), sha256="")
            elif aggregate.status in ("delivered", "cancelled"):
                raise CommandError(f"delivery is {aggregate.status}; nothing to cancel")
            aggregate.cancel(**actor.ctx(), reason=reason or f"cancelled by {actor.name}")
            return aggregate
        return change

    def change_many(self, operation: str, targets: Sequence[tuple[str, str]], actor: Actor,
                    reason: str = "") -> tuple[int, int]:
        """Requeue or cancel several deliveries (job id, destination) in one save: how many
        were changed and how many were left alone (delivered or cancelled meanwhile). When
        the dispatcher recorded an outcome of one of them between our read and our save,
        each is done again on its own, read again and decided again."""
        changed: list[Any] = []
        skipped = 0
        for job_id, destination in targets:
            change = (self._requeuing(actor, reason) if operation == "requeue" else
                      self._cancelling(job_id, destination, actor, reason))
            try:
                aggregate = change(self._get_delivery(job_id, destination))
            except CommandError:
                skipped += 1
                continue
            if aggregate is not None:
                changed.append(aggregate)
        try:
            if changed:
                self._stores.delivery.save(*changed)
            return len(targets) - skipped, skipped
        except IntegrityError:
            pass
        done = skipped = 0
        for job_id, destination in targets:
            try:
                if operation == "requeue":
                    self.requeue(job_id, destination, actor, reason)
                else:
                    self.cancel(job_id, destination, actor, reason)
                done += 1
            except CommandError:
                skipped += 1
        return done, skipped

    def _change_delivery(self, job_id: str, destination: str,
                         change: Callable[[Any], Any]) -> None:
        """The dispatcher may record an attempt between our read and our save: then read
        again and decide again (a delivery that has just arrived is no longer requeued)."""
        save_changed(lambda: self._get_delivery(job_id, destination), change,
                     self._stores.delivery.save)

    def _get_delivery(self, job_id: str, destination: str) -> Any:
        return self._get_from(self._stores.delivery, Delivery, delivery_id(job_id, destination))

    # --- config file ----------------------------------------------------------------
    def apply(self, destinations: Sequence[Mapping[str, Any]],
              rules: Sequence[Mapping[str, Any]], actor: Actor = CONFIG_ACTOR,
              transforms: Sequence[Mapping[str, Any]] = ()) -> dict[str, int]:
        """Make the store match a TOML file's transforms, destinations and rules (idempotent).

        Items the file declared before (actor ``config``) and no longer declares are deleted;
        items created by people in the UI or API are left alone, and so are items an admin
        detached from the file (counted in ``detached``).
        """
        changed = {"transforms": 0, "destinations": 0, "rules": 0, "deleted": 0,
                   "detached": 0}
        for item in transforms:  # first: destinations and rules name them
            try:
                changed["transforms"] += self.put_transform(item, actor)
            except TransformError as exc:
                raise CommandError(str(exc)) from None
        for item in destinations:
            if self.detached("destination", str(item.get("name"))):
                changed["detached"] += 1
                continue
            changed["destinations"] += self.put_destination(item, actor)
        for item in rules:
            if self.detached("rule", str(item.get("name"))):
                changed["detached"] += 1
                continue
            changed["rules"] += self.put_rule(item, actor)
        declared_rules = {str(r.get("name")) for r in rules}
        declared_dest = {str(d.get("name")) for d in destinations}
        for rule in self._admin.refresh().rules:
            if rule.spec.name not in declared_rules and not self.detached(
                "rule", rule.spec.name) and self._created_by(
                Rule, rule_id(rule.spec.name), actor.name
            ):
                self.delete_rule(rule.spec.name, actor)
                changed["deleted"] += 1
        for name in self._admin.refresh().live_destinations():
            if name not in declared_dest and not self.detached("destination", name) and (
                self._created_by(Destination, destination_id(name), actor.name)
            ):
                self.delete_destination(name, actor)
                changed["deleted"] += 1
        declared_transforms = {str(t.get("name")) for t in transforms}
        for name in self._admin.refresh().transforms:
            if name not in declared_transforms and self._created_by(
                Transform, transform_id(name), actor.name
            ):
                self.delete_transform(name, actor)
                changed["deleted"] += 1
        return changed

    def detached(self, kind: str, name: str) -> bool:
        """Whether rule or destination ``name`` was detached from the TOML file."""
        cls, make_id = (Rule, rule_id) if kind == "rule" else (Destination, destination_id)
        aggregate = self._get(cls, make_id(name))
        return bool(aggregate is not None and getattr(aggregate, "detached", False))

    def detach(self, kind: str, name: str, actor: Actor, reason: str = "") -> bool:
        """Detach a rule or destination from the TOML file: from now on the file (at start or
        ``dicom-router apply``) neither overwrites nor deletes it. False if it already was."""
        cls, make_id = (Rule, rule_id) if kind == "rule" else (Destination, destination_id)
        aggregate = self._require(cls, make_id(name), f"{kind} {name!r}")
        if getattr(aggregate, "detached", False):
            return False
        aggregate.detach(**actor.ctx(), reason=reason)
        self._save_admin(aggregate)
        return True

    def _created_by(self, cls: type, aggregate_id: uuid.UUID, actor_name: str) -> bool:
        events = list(self._stores.admin.events.get(aggregate_id, lte=1))
        return bool(events) and getattr(events[0], "actor", None) == actor_name

    # --- helpers --------------------------------------------------------------------
    def _save_admin(self, aggregate: Any) -> None:
        self._stores.admin.save(aggregate)
        self._admin.refresh()

    def _get(self, cls: type, aggregate_id: uuid.UUID) -> Any:
        return self._get_from(self._stores.admin, cls, aggregate_id)

    @staticmethod
    def _get_from(app: Any, cls: type, aggregate_id: uuid.UUID) -> Any:
        try:
            aggregate = app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, cls) else None

    def _require(self, cls: type, aggregate_id: uuid.UUID, label: str) -> Any:
        aggregate = self._get(cls, aggregate_id)
        if aggregate is None:
            raise NotFoundError(f"{label} does not exist")
        return aggregate

