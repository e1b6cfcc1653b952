"""The storage push listener (router/dicom/push_scp.py) with real peers: which associations
it serves and which it leaves to pynetdicom, its limits, and what an association that ends
badly leaves behind (nothing)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from router.dicom import pdus, push_scp
from router.service import Router
from tests.conftest import make_settings, wait_for
from tests.synthetic import make_ct_series
from tests.unit.test_pdus import _request_bytes

ROUTER_AET = "DICOMROUTER"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Calling AE titles of the associations push_scp served."""
    calls: list[str] = []
    run = push_scp.PushAssociation.run

    def counting(self: Any, over_limit: bool) -> None:
        calls.append(self._request.calling_aet)
        run(self, over_limit)

    monkeypatch.setattr(push_scp.PushAssociation, "run", counting)
    yield calls


@pytest.fixture
def router(tmp_path: Path, start_router: Callable[..., Router]) -> Router:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    settings = replace(settings, dicom=replace(settings.dicom, max_associations=2,
                                               open_query_retrieve=True, network_timeout=2,
                                               max_pdu_size=1 << 19, max_incoming_pdu=1 << 20))
    return start_router(settings)


def _jobs(router: Router) -> list[dict[str, Any]]:
    return router.view_db("jobs").query("SELECT sop_instance_uid FROM jobs")


def test_a_push_is_served_here_and_a_query_association_by_pynetdicom(
    router: Router, served: list[str], tmp_path: Path
) -> None:
    (path,) = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
    dataset = dcmread(path)
    ae = AE(ae_title="PUSHER")
    ae.add_requested_context(CTImageStorage, str(dataset.file_meta.TransferSyntaxUID))
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(dataset).Status == 0
    assoc.release()
    assert served == ["PUSHER"]

    # Storage and query on one association: pynetdicom serves both.
    mixed = AE(ae_title="MIXED")
    mixed.add_requested_context(CTImageStorage, str(dataset.file_meta.TransferSyntaxUID))
    mixed.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = mixed.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET)
    assert assoc.is_established
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.2"
    assert assoc.send_c_store(dataset).Status == 0
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    statuses = [status.Status for status, _ in assoc.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind)]
    assert statuses[-1] == 0
    assoc.release()
    assert served == ["PUSHER"]
    wait_for(lambda: len(_jobs(router)) == 2, 10, "both instances received")


def test_associations_beyond_the_limit_are_rejected_as_pynetdicom_does(
    router: Router, served: list[str]
) -> None:
    ae = AE(ae_title="PUSHER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET) for _ in range(2)]
    assert all(a.is_established for a in held)
    third = ae.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET)
    assert third.is_rejected
    rejection = third.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    for assoc in held:
        assoc.release()
    fourth = ae.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET)
    assert fourth.is_established
    fourth.release()


def _associate_raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(_request_bytes())
    header = sock.recv(6, socket.MSG_WAITALL)
    kind, _, length = struct.unpack(">BBL", header)
    assert kind == pdus.A_ASSOCIATE_AC
    ac = A_ASSOCIATE_AC()
    ac.decode(header + sock.recv(length, socket.MSG_WAITALL))
    return sock


def _spool_files(router: Router) -> list[Path]:
    return list(router.blobs.spool_dir.iterdir())


def _store_command(uid: str) -> bytes:
    command = pdus.encode_response(0x0001, "1.2.840.10008.5.1.4.1.1.2", 1, 0, uid)
    # encode_response writes Command Data Set Type 0x0101 (none): this one has a dataset.
    return command.replace(struct.pack("<HHLH", 0, 0x0800, 2, 0x0101),
                           struct.pack("<HHLH", 0, 0x0800, 2, 0x0000))


def test_a_peer_gone_in_the_middle_of_a_dataset_leaves_no_spool_file(
    router: Router, served: list[str]
) -> None:
    sock = _associate_raw(router.dicom.port)
    sock.sendall(pdus.encode_pdata(1, True, _store_command("1.2.3.4"), 0))
    sock.sendall(pdus.encode_pdata(1, False, b"\x08\x00" * 500, 0)[:-10])  # not the last one
    wait_for(lambda: len(_spool_files(router)) == 1, 5, "the spool file of the C-STORE")
    sock.close()
    wait_for(lambda: _spool_files(router) == [], 5, "the spool file to be removed")
    assert served == ["MODALITY"]
    assert _jobs(router) == []


def test_a_silent_peer_is_aborted_after_the_network_timeout(router: Router) -> None:
    sock = _associate_raw(router.dicom.port)
    sock.sendall(pdus.encode_pdata(1, True, _store_command("1.2.3.4"), 0))
    started = time.monotonic()
    sock.settimeout(10)
    data = sock.recv(64)  # A-ABORT, then the connection ends
    assert data[:1] == bytes([pdus.A_ABORT])
    assert 1.5 < time.monotonic() - started < 8
    wait_for(lambda: _spool_files(router) == [], 5, "the spool file to be removed")


def test_an_oversized_pdu_drops_the_association(router: Router) -> None:
    sock = _associate_raw(router.dicom.port)
    sock.sendall(struct.pack(">BBL", pdus.P_DATA_TF, 0, 1 << 30) + b"\0" * 64)
    sock.settimeout(5)
    data = sock.recv(64)
    assert data[:1] == bytes([pdus.A_ABORT])
    with contextlib.suppress(ConnectionResetError):  # unread bytes make the close a reset
        assert sock.recv(64) == b""


def test_a_dataset_without_a_request_aborts(router: Router) -> None:
    sock = _associate_raw(router.dicom.port)
    sock.sendall(pdus.encode_pdata(1, False, b"\0" * 16, 0))
    sock.settimeout(5)
    assert sock.recv(64)[:1] == bytes([pdus.A_ABORT])


def test_a_large_object_is_written_back_while_it_arrives(
    router: Router, served: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects above EARLY_SYNC_BYTES start their write-back before the last byte; the bytes
    stored are the bytes sent."""
    from router.dicom import spool

    started: list[tuple[int, int]] = []
    real = spool.start_writeback

    def counting(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(spool, "start_writeback", counting)
    (path,) = make_ct_series(tmp_path / "big", count=1, rows=2048, cols=2048)  # 8 MB
    dataset = dcmread(path)
    ae = AE(ae_title="PUSHER")
    ae.add_requested_context(CTImageStorage, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", router.dicom.port, ae_title=ROUTER_AET,
                         max_pdu=1 << 20)
    assert assoc.send_c_store(dataset).Status == 0
    assoc.release()
    assert served == ["PUSHER"]
    # In order and without gaps: one range per EARLY_SYNC_BYTES as it arrived, then the tail.
    assert len(started) >= 2 and started[0][0] == 0
    assert started[0][1] >= spool.EARLY_SYNC_BYTES
    assert all(b[0] == a[0] + a[1] for a, b in itertools.pairwise(started))
    (row,) = wait_for(lambda: router.view_db("jobs").query("SELECT sha256 FROM jobs"), 10,
                      "the job")
    stored = router.blobs.path_for(row["sha256"])
    assert dcmread(stored).PixelData == dataset.PixelData


def test_one_router_forwards_to_another_over_both_of_our_implementations(
    router: Router, served: list[str], tmp_path: Path
) -> None:
    """Multi-site: our C-STORE SCU (store_scu, behind DicomAdapter) into our push_scp."""
    from router.dispatch.base import Outgoing
    from router.dispatch.dicom import DicomAdapter, DicomDestinationConfig
    from router.dispatch.ssrf import AddressPolicy

    paths = make_ct_series(tmp_path / "ct", count=3, rows=256, cols=256)
    adapter = DicomAdapter(DicomDestinationConfig(
        name="site-b", host="127.0.0.1", port=router.dicom.port, ae_title=ROUTER_AET),
        calling_ae="SITE_A", policy=AddressPolicy(allow_loopback=True))
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        item = Outgoing(
            delivery_id=path.name, path=path, sha256="0" * 64, size=path.stat().st_size,
            sop_class_uid=str(header.SOPClassUID), sop_instance_uid=str(header.SOPInstanceUID),
            transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
            load_header=lambda header=header: header)
        assert adapter.send(item) == "stored"
    assert adapter.check().startswith("C-ECHO ok")
    adapter.close()
    assert served == ["SITE_A", "SITE_A"]  # the stores' association, then the echo's
    rows = wait_for(lambda: len(_jobs(router)) == 3 and _jobs(router), 10, "three receipts")
    stored = {r["sop_instance_uid"] for r in rows}
    assert stored == {str(dcmread(p).SOPInstanceUID) for p in paths}


def test_a_command_set_that_never_ends_aborts(router: Router) -> None:
    sock = _associate_raw(router.dicom.port)
    fragment = struct.pack(">BBLLBB", pdus.P_DATA_TF, 0, 6 + 16384, 2 + 16384, 1, 1)
    sock.settimeout(5)
    with contextlib.suppress(OSError):  # the router may close while we are still sending
        for _ in range(8):  # 128 KB of command fragments, none of them the last
            sock.sendall(fragment + b"\0" * 16384)
    assert sock.recv(64)[:1] == bytes([pdus.A_ABORT])
