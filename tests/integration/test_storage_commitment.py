"""Storage Commitment Push Model as SCP, driven by a pynetdicom SCU (DCMTK's storescu has no
commitment): the report on the same association and on a new one to the requester's own SCP
on 127.0.0.2, instances never received (0x0112) and of another SOP class (0x0119), refusals
(unknown calling AE, bad requests), the archive-destination mode with a DCMTK storescp up and
down, a receiver process, and a restart with a commitment outstanding.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from router.application.commands import Actor
from router.dicom import commitment_scp
from tests.conftest import make_settings, wait_for
from tests.integration.peers import StoreScp, free_port

MODALITY = "MODALITY"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
REPORT_HOST = "127.0.0.2"  # where the modality's own SCP takes reports on new associations


def ct_instance(number: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.PatientName, ds.PatientID = "COMMIT^TEST", "C1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.InstanceNumber = "CT", number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()
    return ds


def request(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


@dataclass
class Reports:
    """N-EVENT-REPORTs received: (event type, Event Information), in order."""

    items: list[tuple[int, Dataset]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: Any) -> tuple[int, None]:
        with self.lock:
            self.items.append((int(event.event_type), event.event_information))
        return 0x0000, None

    def wait(self, count: int, timeout: float) -> list[tuple[int, Dataset]]:
        wait_for(lambda: len(self.items) >= count, timeout, f"{count} commitment report(s)")
        return list(self.items)


@dataclass
class Modality:
    """A pynetdicom SCU that stores, asks for commitment and takes reports."""

    port: int
    same: Reports = field(default_factory=Reports)

    def associate(self) -> Any:
        ae = AE(ae_title=MODALITY)
        for sop_class in (CTImageStorage, MRImageStorage, StorageCommitmentPushModel):
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMROUTER",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.same.handle)])
        assert assoc.is_established
        return assoc

    def store_and_commit(self, instances: list[Dataset], references: list[tuple[str, str]],
                         transaction_uid: str, *, wait_report: float = 0.0,
                         action_type: int = 1) -> Dataset:
        """C-STORE ``instances``, N-ACTION; with ``wait_report``, keep the association open
        that long for the report. The N-ACTION's status dataset."""
        assoc = self.associate()
        try:
            for ds in instances:
                assert assoc.send_c_store(ds).Status == 0x0000
            status, _ = assoc.send_n_action(request(transaction_uid, references), action_type,
                                            StorageCommitmentPushModel, WELL_KNOWN)
            if wait_report and status.Status == 0x0000:
                self.same.wait(len(self.same.items) + 1, wait_report)
        finally:
            assoc.release()
        return status


@pytest.fixture
def report_scp() -> Iterator[tuple[int, Reports]]:
    """The modality's SCP for reports on a new association (it accepts our SCP role)."""
    reports = Reports()
    ae = AE(ae_title=MODALITY)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    port = free_port()
    server = ae.start_server((REPORT_HOST, port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    yield port, reports
    server.shutdown()


@pytest.fixture
def commit_router(tmp_path: Path, start_router: Callable[..., Any],
                  report_scp: tuple[int, Reports]) -> Callable[..., Any]:
    """A router knowing the modality as a remote node (reports go to its SCP)."""

    def start(database_url: str = "", **overrides: Any) -> Any:
        settings = make_settings(tmp_path, database_url or f"sqlite:///{tmp_path / 'db'}")
        dicom = {k: overrides.pop(k) for k in list(overrides) if k.startswith(("commitment",
                                                                              "processes"))}
        # Deliveries retried within a second (the restart test's archive comes back up).
        dispatch = replace(settings.dispatch, retry_delays=(1.0,), retry_every_after=1.0)
        settings = replace(settings, dicom=replace(settings.dicom, **dicom), dispatch=dispatch,
                           **overrides)
        router = start_router(settings)
        router.remote_nodes.put({"name": "modality", "ae_title": MODALITY, "host": REPORT_HOST,
                                 "port": report_scp[0]}, Actor("test"))
        return router

    return start


def audit_rows(router: Any, count: int, prefix: str = "Commitment.") -> list[dict[str, Any]]:
    def rows() -> list[dict[str, Any]]:
        router.runner.wake()
        return router.view_db("audit").query(
            "SELECT action, actor, outcome, detail FROM audit WHERE action LIKE ?"
            " ORDER BY occurred_at, position", (prefix + "%",))

    wait_for(lambda: len(rows()) >= count, 10, f"{count} {prefix} audit rows")
    return rows()


def referenced(ds: Dataset, keyword: str) -> dict[str, tuple[str, int | None]]:
    return {str(i.ReferencedSOPInstanceUID): (str(i.ReferencedSOPClassUID),
                                              i.get("FailureReason"))
            for i in ds.get(keyword, [])}


def test_report_on_the_same_association_names_missing_and_mismatched_instances(
        database_url: str, commit_router: Callable[..., Any]) -> None:
    router = commit_router(database_url)
    modality = Modality(router.dicom.port)
    a, b = ct_instance(1), ct_instance(2)
    never = generate_uid()
    tx = generate_uid()
    status = modality.store_and_commit(
        [a, b], [(CTImageStorage, a.SOPInstanceUID), (CTImageStorage, never),
                 (MRImageStorage, b.SOPInstanceUID)], tx, wait_report=15)
    assert status.Status == 0x0000
    event_type, info = modality.same.items[0]
    assert event_type == 2 and info.TransactionUID == tx
    assert referenced(info, "ReferencedSOPSequence") == {a.SOPInstanceUID: (CTImageStorage,
                                                                            None)}
    assert referenced(info, "FailedSOPSequence") == {
        never: (CTImageStorage, 0x0112), b.SOPInstanceUID: (MRImageStorage, 0x0119)}

    tx_class = generate_uid()  # a SOP class the router does not store at all: 0x0122
    modality.store_and_commit([], [(CTImageStorage, a.SOPInstanceUID),
                                   ("1.2.3.4.5.6.7", never)], tx_class, wait_report=15)
    _, info = modality.same.items[1]
    assert referenced(info, "FailedSOPSequence") == {never: ("1.2.3.4.5.6.7", 0x0122)}
    modality.same.items.pop()

    tx2 = generate_uid()  # everything committed: event type 1, no Failed SOP Sequence
    modality.store_and_commit([], [(CTImageStorage, a.SOPInstanceUID),
                                   (CTImageStorage, b.SOPInstanceUID)], tx2, wait_report=15)
    event_type, info = modality.same.items[1]
    assert event_type == 1 and "FailedSOPSequence" not in info
    assert set(referenced(info, "ReferencedSOPSequence")) == {a.SOPInstanceUID,
                                                               b.SOPInstanceUID}
    rows = audit_rows(router, 6)
    assert [r["action"] for r in rows] == ["Commitment.Requested", "Commitment.Reported"] * 3
    assert rows[0]["actor"] == MODALITY and rows[1]["actor"] == "system"
    assert '"via": "same association"' in rows[1]["detail"]
    assert '"failed": 2' in rows[1]["detail"] and '"committed": 1' in rows[1]["detail"]
    view = router.view_db("jobs").query(
        "SELECT status, event_type, via FROM storage_commitments WHERE transaction_uid = ?",
        (tx,))
    assert [dict(r) for r in view] == [{"status": "reported", "event_type": 2,
                                        "via": "same association"}]


@pytest.mark.parametrize("processes", [0, 1])
def test_report_on_a_new_association_after_the_requester_released(
        processes: int, commit_router: Callable[..., Any],
        report_scp: tuple[int, Reports]) -> None:
    router = commit_router(processes=processes)
    port = router.receivers.port if router.receivers is not None else router.dicom.port
    modality = Modality(port)
    a = ct_instance()
    tx = generate_uid()
    assert modality.store_and_commit([a], [(CTImageStorage, a.SOPInstanceUID)],
                                     tx).Status == 0x0000
    event_type, info = report_scp[1].wait(1, 20)[0]
    assert event_type == 1 and info.TransactionUID == tx
    assert set(referenced(info, "ReferencedSOPSequence")) == {a.SOPInstanceUID}
    assert modality.same.items == []
    rows = audit_rows(router, 2)
    assert '"via": "new association"' in rows[-1]["detail"]


def test_refusals_name_the_problem_and_are_audited(
        commit_router: Callable[..., Any], report_scp: tuple[int, Reports]) -> None:
    router = commit_router()
    a = ct_instance()
    modality = Modality(router.dicom.port)
    # Action Type 2 does not exist in Storage Commitment.
    status = modality.store_and_commit([a], [(CTImageStorage, a.SOPInstanceUID)],
                                       generate_uid(), action_type=2)
    assert status.Status == 0x0123
    # A Transaction UID that is no UID (pydicom warns while encoding it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        status = modality.store_and_commit([], [(CTImageStorage, a.SOPInstanceUID)], "1.2.x")
    assert status.Status == 0x0115 and "Transaction UID" in str(status.ErrorComment)
    # A reused Transaction UID: accepted, and every instance reported failed with the
    # Failure Reason 0x0131 (Duplicate transaction UID, PS3.4 J.3.3.1.1) on the association.
    tx = generate_uid()
    assert modality.store_and_commit([], [(CTImageStorage, a.SOPInstanceUID)],
                                     tx).Status == 0x0000
    assert modality.store_and_commit([], [(CTImageStorage, a.SOPInstanceUID),
                                          (CTImageStorage, "1.2.3.9")],
                                     tx, wait_report=15).Status == 0x0000
    event_type, info = modality.same.items[-1]
    assert event_type == 2 and info.TransactionUID == tx
    assert "ReferencedSOPSequence" not in info
    assert referenced(info, "FailedSOPSequence") == {a.SOPInstanceUID: (CTImageStorage, 0x0131),
                                                     "1.2.3.9": (CTImageStorage, 0x0131)}
    # An AE that is no remote node: no report could reach it.
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", router.dicom.port, ae_title="DICOMROUTER")
    status, _ = assoc.send_n_action(request(generate_uid(), [(CTImageStorage,
                                                             a.SOPInstanceUID)]),
                                    1, StorageCommitmentPushModel, WELL_KNOWN)
    assoc.release()
    assert status.Status == 0x0124 and "not a known remote node" in str(status.ErrorComment)
    denied = audit_rows(router, 4, prefix="dimse.commitment")
    assert [r["outcome"] for r in denied] == ["denied"] * 4
    assert denied[-1]["actor"] == "STRANGER" and "not a known remote node" in denied[-1]["detail"]
    assert "0x0123" in denied[0]["detail"]
    assert "0x0131" in denied[2]["detail"] and "Transaction UID" in denied[2]["detail"]
    report_scp[1].wait(1, 20)  # the one accepted request was answered
    assert len(audit_rows(router, 2)) == 2  # only that request and its report were recorded


def archive_settings(tmp_path: Path, port: int) -> dict[str, Any]:
    return {"destinations": ({"name": "archive", "type": "dicom", "host": "127.0.0.1",
                              "port": port, "ae_title": "STORESCP", "concurrency": 1},),
            "rules": ({"name": "all", "calling_aet": "*", "destinations": ["archive"]},),
            "commitment_destination": "archive"}


def test_archive_mode_commits_what_the_archive_took_and_times_out_the_rest(
        tmp_path: Path, commit_router: Callable[..., Any], dcmtk: None) -> None:
    with StoreScp(tmp_path / "scp") as scp:
        router = commit_router(commitment_timeout=6.0, **archive_settings(tmp_path, scp.port))
        modality = Modality(router.dicom.port)
        a = ct_instance()
        started = time.monotonic()
        modality.store_and_commit([a], [(CTImageStorage, a.SOPInstanceUID)], generate_uid(),
                                  wait_report=20)
        event_type, info = modality.same.items[0]
        assert event_type == 1 and set(referenced(info, "ReferencedSOPSequence")) == {
            a.SOPInstanceUID}
        assert time.monotonic() - started < 6.0  # reported once delivered, not at the deadline
        assert (scp.folder / f"CT.{a.SOPInstanceUID}").exists()
        scp.stop()  # the archive is down now
        b = ct_instance(2)
        started = time.monotonic()
        modality.store_and_commit([b], [(CTImageStorage, b.SOPInstanceUID)], generate_uid(),
                                  wait_report=20)
        event_type, info = modality.same.items[1]
        assert event_type == 2
        assert referenced(info, "FailedSOPSequence") == {b.SOPInstanceUID: (CTImageStorage,
                                                                            0x0110)}
        assert time.monotonic() - started >= 5.0  # waited for the deadline


def test_outstanding_commitment_is_reported_after_a_restart(
        tmp_path: Path, commit_router: Callable[..., Any], start_router: Callable[..., Any],
        report_scp: tuple[int, Reports], dcmtk: None) -> None:
    down_port = free_port()  # the archive is down while the request is made
    router = commit_router(commitment_timeout=120.0, **archive_settings(tmp_path, down_port))
    a = ct_instance()
    tx = generate_uid()
    assert Modality(router.dicom.port).store_and_commit(
        [a], [(CTImageStorage, a.SOPInstanceUID)], tx).Status == 0x0000
    audit_rows(router, 1)
    router.stop()  # with the report outstanding: the archive has not taken the instance
    assert report_scp[1].items == []
    # The archive is up on the port the destination names, under the restarted router.
    with StoreScp(tmp_path / "scp", port=down_port) as scp:
        restarted = start_router(router.settings)
        event_type, info = report_scp[1].wait(1, 40)[0]
        assert event_type == 1 and info.TransactionUID == tx
        assert (scp.folder / f"CT.{a.SOPInstanceUID}").exists()
        actions = [r["action"] for r in audit_rows(restarted, 2)]
        assert actions == ["Commitment.Requested", "Commitment.Reported"]


def start_report_scp(port: int, reports: Reports) -> Any:
    ae = AE(ae_title=MODALITY)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    return ae.start_server((REPORT_HOST, port), block=False,
                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])


def test_report_to_a_requester_that_is_down_is_retried_then_abandoned(
        tmp_path: Path, start_router: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commitment_scp, "RETRY_DELAYS", (0.5, 0.5))
    router = start_router(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    port = free_port()  # the modality's SCP for reports is not up yet
    router.remote_nodes.put({"name": "modality", "ae_title": MODALITY, "host": REPORT_HOST,
                             "port": port}, Actor("test"))
    modality = Modality(router.dicom.port)
    a = ct_instance()
    modality.store_and_commit([a], [(CTImageStorage, a.SOPInstanceUID)], generate_uid())
    failed = audit_rows(router, 2)
    assert failed[1]["action"] == "Commitment.ReportFailed" and failed[1]["outcome"] == "failure"
    reports = Reports()
    server = start_report_scp(port, reports)  # up now: the retry gets through
    try:
        assert reports.wait(1, 20)[0][0] == 1
    finally:
        server.shutdown()
    assert audit_rows(router, 3)[-1]["action"] == "Commitment.Reported"

    b = ct_instance(2)  # never up: every attempt fails, then the report is given up
    modality.store_and_commit([b], [(CTImageStorage, b.SOPInstanceUID)], generate_uid())
    rows = audit_rows(router, 7)
    assert [r["action"] for r in rows[3:]] == [
        "Commitment.Requested", "Commitment.ReportFailed", "Commitment.ReportFailed",
        "Commitment.Abandoned"]
    assert rows[-1]["outcome"] == "failure" and "given up after 3 attempts" in rows[-1]["detail"]
