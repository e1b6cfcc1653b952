"""Settings changed at run time, event-sourced in the admin log with the user as actor.

Only the names in ``RUNTIME_SETTINGS`` can change; each falls back to the value the TOML
file, the environment or the default gave it. Every other setting is read-only at run time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.commands import Actor, CommandError, NotFoundError
from router.application.stores import EventStores
from router.config_types import (
    Strict,
    adapter,
    docs_of,
    field_type,
    problems_of,
    validation_error,
)
from router.domain.runtime_settings import RUNTIME_SETTINGS_ID, RuntimeSettings
from router.settings import Settings, StorageSettings

CACHE_SECONDS = 2.0  # other nodes' changes are seen within this time


@dataclass(frozen=True)
class RuntimeSpec:
    """A setting that may change at run time: a field of a settings section, whose annotations
    (type, range, Doc) describe it for the file, the environment, the API body, the settings
    page and the OpenAPI document alike."""

    name: str  # section.key
    section: type[Any]  # the section's settings class

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def annotation(self) -> Any:
        """The field's own type, strict: a JSON body has real types ("30" is not 30)."""
        return Annotated[field_type(self.section, self.key), Strict()]

    @property
    def help(self) -> str:
        return docs_of(self.section).get(self.key, "")

    def file_value(self, settings: Settings) -> int:
        section, key = self.name.split(".", 1)
        return int(getattr(getattr(settings, section), key))

    def check(self, value: object) -> int:
        """``value`` validated by the field's annotations; CommandError in the file's words."""
        try:
            return int(adapter(self.annotation).validate_python(value))
        except validation_error() as exc:
            problems = "; ".join(p.message for p in problems_of(exc, self.annotation))
            raise CommandError(f"{self.name}: {problems}") from None


RUNTIME_SETTINGS: dict[str, RuntimeSpec] = {
    "storage.retention_days": RuntimeSpec("storage.retention_days", StorageSettings),
}


@dataclass(frozen=True)
class RuntimeValue:
    """One runtime-changeable setting: effective value, file value, last change."""

    name: str
    value: int
    file_value: int
    overridden: bool
    changed_by: str | None
    changed_at: float | None
    help: str


class RuntimeSettingsStore:
    """Read and change runtime settings (thread-safe; values cached for a moment)."""

    def __init__(self, stores: EventStores, settings: Settings) -> None:
        self._app = stores.admin
        self._settings = settings
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, RuntimeValue]] | None = None

    def get(self, name: str) -> RuntimeValue:
        values = self.all()
        if name not in values:
            raise NotFoundError(f"{name!r} cannot be changed at run time")
        return values[name]

    def value(self, name: str) -> int:
        return self.get(name).value

    def all(self) -> dict[str, RuntimeValue]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
        values = self._read()
        with self._lock:
            self._cached = (time.monotonic(), values)
        return values

    def set(self, name: str, value: int | None, actor: Actor) -> bool:
        """Change a setting (None: back to the file's value); False when nothing changed."""
        spec = RUNTIME_SETTINGS.get(name)
        if spec is None:
            raise NotFoundError(f"{name!r} cannot be changed at run time; it comes from the "
                                "configuration file or the environment")
        if value is not None:
            value = spec.check(value)
        aggregate = self._load() or RuntimeSettings(**actor.ctx())
        previous = aggregate.values.get(name)
        if previous == value:
            return False
        aggregate.change(**actor.ctx(), name=name, value=value, previous=previous)
        try:
            self._app.save(aggregate)
        except IntegrityError:
            raise CommandError("the settings were changed by someone else at the same "
                               "time; reload and try again") from None
        with self._lock:
            self._cached = None
        return True

    def _load(self) -> RuntimeSettings | None:
        try:
            aggregate: object = self._app.repository.get(RUNTIME_SETTINGS_ID)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, RuntimeSettings) else None

    def _read(self) -> dict[str, RuntimeValue]:
        current: dict[str, Any] = {}
        changed: dict[str, tuple[str, float]] = {}
        e: Any
        for e in self._app.events.get(RUNTIME_SETTINGS_ID):
            name = getattr(e, "name", None)
            if name is None:
                continue
            if e.value is None:
                current.pop(name, None)
            else:
                current[name] = e.value
            changed[name] = (e.actor, e.timestamp.timestamp())
        out = {}
        for name, spec in RUNTIME_SETTINGS.items():
            file_value = spec.file_value(self._settings)
            who, when = changed.get(name, (None, None))
            out[name] = RuntimeValue(
                name=name, value=int(current.get(name, file_value)), file_value=file_value,
                overridden=name in current, changed_by=who, changed_at=when, help=spec.help)
        return out
