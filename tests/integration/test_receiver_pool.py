"""Receiver processes: the parent owns the port and hands each connection to the least busy
process; the counts follow associations to their end, whichever code serves them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.conftest import make_settings, wait_for

pytestmark = pytest.mark.usefixtures("dcmtk")


def serving(router: Any) -> list[int]:
    with router.receivers._lock:
        return sorted(len(child.serving) for child in router.receivers._children)


def associate(port: int, context: Any) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(context, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMROUTER")
    assert assoc.is_established
    return assoc


@pytest.fixture
def pooled(tmp_path: Path, start_router: Callable[..., Any]) -> Any:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    return start_router(replace(settings, dicom=replace(settings.dicom, processes=2)))


def test_concurrent_associations_are_spread_evenly_and_counted_to_their_end(
        pooled: Any) -> None:
    port = pooled.receivers.port
    held = [associate(port, CTImageStorage) for _ in range(4)]  # served by push_scp
    # SO_REUSEPORT's hash put four connections 3:1 or 4:0 about five times in eight.
    assert serving(pooled) == [2, 2]
    for assoc in held[:3]:
        assoc.release()
    wait_for(lambda: serving(pooled) == [0, 1], 10, "three finished connections to be counted")
    # A query association is served by pynetdicom on a thread of its own: counted until it ends,
    # and it goes to the idle process.
    query = associate(port, PatientRootQueryRetrieveInformationModelFind)
    assert serving(pooled) == [1, 1]
    held[3].release()
    wait_for(lambda: serving(pooled) == [0, 1], 10, "the push association's end")
    query.release()
    wait_for(lambda: serving(pooled) == [0, 0], 10, "the query association's end")


def test_sequential_associations_alternate_between_processes(pooled: Any) -> None:
    port = pooled.receivers.port
    for _ in range(4):
        assoc = associate(port, Verification)
        assert not assoc.send_c_echo().Status
        assoc.release()
        wait_for(lambda: serving(pooled) == [0, 0], 10, "the echo association's end")
    with pooled.receivers._lock:
        assert sorted(child.handed for child in pooled.receivers._children) == [2, 2]


def test_a_dead_process_is_skipped_and_replaced(pooled: Any) -> None:
    port = pooled.receivers.port
    first = pooled.receivers._children[0]
    first.process.kill()
    first.process.wait(5)
    for _ in range(3):  # all to the survivor, none lost, until the replacement is up
        assoc = associate(port, Verification)
        assert not assoc.send_c_echo().Status
        assoc.release()
    wait_for(lambda: pooled.receivers._children[0] is not first
             and pooled.receivers.alive(), 30, "a replacement receiver process")
    assoc = associate(port, Verification)
    assert not assoc.send_c_echo().Status
    assoc.release()
