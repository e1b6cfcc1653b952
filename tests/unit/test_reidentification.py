"""The re-identification map: pseudonyms recorded once (also after a restart, by a new map on
the same log), originals sealed (never in the event in clear, bound to their entry), lookups
by patient or study pseudonym, and the project seed derived from the master key."""

from __future__ import annotations

import json

import pytest

from router.application.commands import CommandError, NotFoundError
from router.application.reidentification import ReidentificationMap, project_seed
from router.application.stores import EventStores, StoreConfig
from router.domain.reidentification import pseudonym_id
from router.secrets import SecretBox, SecretError
from router.transforms.deid import Identity

BOX = SecretBox(bytes(range(32)))
IDENTITY = Identity("1CT1", "Doe^Jane", "1.2.3", "PSEUDO1", "SMITH^ANN", "2.25.9")


def test_recorded_once_sealed_and_found_by_patient_or_study() -> None:
    stores = EventStores(StoreConfig("memory:"))
    first = ReidentificationMap(stores.delivery, BOX)
    assert first.record("trial", IDENTITY, "corr") == 2
    assert first.record("trial", IDENTITY, "corr") == 0  # known in this process
    restarted = ReidentificationMap(stores.delivery, BOX)
    assert restarted.record("trial", IDENTITY, "corr") == 0  # known in the log
    found = restarted.lookup("trial", "patient", "PSEUDO1")
    assert (found["patient_id"], found["patient_name"], found["study_instance_uid"]) == (
        "1CT1", "Doe^Jane", "1.2.3")
    assert restarted.lookup("trial", "study", "2.25.9")["pseudo_patient_id"] == "PSEUDO1"
    [event] = stores.delivery.events.get(pseudonym_id("trial", "patient", "PSEUDO1"))
    assert "1CT1" not in json.dumps(vars(event), default=str)
    assert "Doe" not in json.dumps(vars(event), default=str)
    with pytest.raises(SecretError):  # bound to its entry: does not open as another one
        BOX.open(event.sealed, context="reid/trial/patient/OTHER")
    with pytest.raises(NotFoundError, match="no patient pseudonym 'PSEUDO1' in project 'x'"):
        restarted.lookup("x", "patient", "PSEUDO1")
    with pytest.raises(CommandError, match="kind: expected one of patient, study"):
        restarted.lookup("trial", "person", "PSEUDO1")


def test_project_seeds_are_stable_secret_and_distinct() -> None:
    assert project_seed(BOX, "a") == project_seed(SecretBox(bytes(range(32))), "a")
    assert project_seed(BOX, "a") != project_seed(BOX, "b")
    assert project_seed(BOX, "a") != project_seed(SecretBox(bytes(32)), "a")
    assert len(project_seed(BOX, "a")) == 64
