"""The audit view reads an event's detail fields from its instance attributes
(``projections.audit._fields``); that equals asking ``hasattr`` of each allowed name only
while no event class has one of those names as a class attribute or property."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from eventsourcing.domain import DomainEvent

import router.domain
from projections.audit import DETAIL_FIELDS, _fields


def event_classes() -> set[type]:
    found: set[type] = set()
    for info in pkgutil.iter_modules(router.domain.__path__):
        module = importlib.import_module(f"router.domain.{info.name}")
        for obj in vars(module).values():
            if not inspect.isclass(obj):
                continue
            for cls in (obj, *(v for v in vars(obj).values() if inspect.isclass(v))):
                if issubclass(cls, DomainEvent):
                    found.add(cls)
    return found


def test_no_event_class_has_a_detail_field_as_a_class_attribute() -> None:
    classes = event_classes()
    assert len(classes) > 50  # every aggregate's events, not an empty scan
    clashes = {cls.__qualname__: [f for f in DETAIL_FIELDS if hasattr(cls, f)]
               for cls in classes}
    assert {name: names for name, names in clashes.items() if names} == {}


def test_fields_are_the_allowed_instance_attributes_only() -> None:
    event = object.__new__(DomainEvent)
    object.__setattr__(event, "__dict__", {"status": "ok", "password_hash": "x",
                                           "destination": "pacs", "index": {"PatientID": "P"}})
    assert _fields(event) == {"status": "ok", "destination": "pacs"}
