"""Dataset policy on receipt, over real associations (issue 15): deep nesting is refused 0xC000
with its reason (it was acknowledged and then dead-lettered, or answered 0xA700), a SOP class
unlike the presentation context's is refused 0xA900 on both listeners unless the site accepts
it, and invalid UIDs are refused, or repaired where a site asks for it."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from router.dicom.uids import repaired_uid
from router.service import Router
from router.settings import Settings
from tests.conftest import make_settings, wait_for
from tests.hostile import identity, nested, write

ROUTER_AET = "DICOMROUTER"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def settings_for(tmp_path: Path, **ingest: Any) -> Settings:
    folder = tmp_path / "archive"
    folder.mkdir(parents=True, exist_ok=True)
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'db'}",
        destinations=({"name": "archive", "type": "file", "path": str(folder)},),
        rules=({"name": "everything", "destinations": ["archive"]},))
    return replace(settings, ingest=replace(settings.ingest, **ingest))


def c_store(port: int, paths: Sequence[Path], pynetdicom_served: bool = False) -> list[int]:
    """Each file's dataset as it is, on one association: storage contexts only (served by
    push_scp), or with a query context too (served by pynetdicom)."""
    ae = AE(ae_title="MODALITY1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    if pynetdicom_served:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=ROUTER_AET)
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we send
            return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def failures(router: Router) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("jobs").query(
        "SELECT status, reason, sop_instance_uid FROM receipt_failures ORDER BY rowid")


def jobs(router: Router) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("jobs").query("SELECT job_id, sop_instance_uid, sha256 FROM jobs")


def test_deep_nesting_is_refused_with_its_reason_never_acknowledged_or_a700(
        tmp_path: Path, start_router: Callable[..., Router]) -> None:
    router = start_router(settings_for(tmp_path))
    paths = []
    for depth in (64, 65, 300, 600):  # 300: was 0x0000 then dead-lettered; 600: was 0xA700
        for defined in (False, True):
            path = tmp_path / f"nested-{depth}-{defined}.dcm"
            write(path, nested(depth, defined))
            paths.append(path)

    statuses = c_store(router.dicom.port, paths)

    assert statuses == [0, 0] + [0xC000] * 6
    assert [f["reason"] for f in failures(router)] == [
        "sequences nested deeper than 64 levels"] * 6
    wait_for(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) == 2, 20,
             "the two objects within the limit to be delivered")


@pytest.mark.parametrize("pynetdicom_served", [False, True], ids=["push_scp", "pynetdicom"])
def test_a_sop_class_unlike_the_contexts_is_refused_unless_accepted(
        tmp_path: Path, start_router: Callable[..., Router], pynetdicom_served: bool) -> None:
    ds = identity()  # a CT image...
    path = tmp_path / "mismatch.dcm"
    write(path, b"", ds)
    data = bytearray(path.read_bytes())
    # ... sent on a Secondary Capture context (the file meta names the class to propose).
    ct, sc = ds.SOPClassUID.encode(), SECONDARY_CAPTURE.encode()
    at = data.index(ct + b"\0")
    path.write_bytes(bytes(data[:at]) + sc + bytes(data[at + len(ct):]))
    assert pydicom.filereader.read_file_meta_info(path).MediaStorageSOPClassUID == sc.decode()
    strict = start_router(settings_for(tmp_path / "strict"))
    assert c_store(strict.dicom.port, [path], pynetdicom_served) == [0xA900]
    assert [f["reason"] for f in failures(strict)] == [
        "SOP Class UID in the dataset differs from the presentation context's abstract syntax"]
    lenient = start_router(settings_for(tmp_path / "lenient", sop_class_mismatch="accept"))
    assert c_store(lenient.dicom.port, [path], pynetdicom_served) == [0]


def test_invalid_uids_are_refused_or_repaired_so_blob_index_and_delivery_agree(
        tmp_path: Path, start_router: Callable[..., Router]) -> None:
    path = tmp_path / "hostile.dcm"
    bad_instance, bad_study = f"1.2..{uuid.uuid4().int}"[:60], "../x"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(bad_instance)
    ds.StudyInstanceUID = bad_study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)

    strict = start_router(settings_for(tmp_path / "strict"))
    assert c_store(strict.dicom.port, [path]) == [0xC000]
    assert [f["reason"] for f in failures(strict)] == [
        "SOP Instance UID is not digits and dots with no empty component (PS3.5 9.1)"]

    router = start_router(settings_for(tmp_path / "repair", invalid_uids="repair"))
    # Stored with a warning: Coercion of Data Elements. The resend is a duplicate.
    assert c_store(router.dicom.port, [path, path]) == [0xB000, 0xB000]
    new_instance, new_study = repaired_uid(bad_instance), repaired_uid(bad_study)
    rows = jobs(router)
    assert {r["sop_instance_uid"] for r in rows} == {new_instance} and len(rows) == 2
    job: Any = router.stores.ingest.repository.get(uuid.UUID(rows[0]["job_id"]))
    assert job.repaired_uids == {"SOPInstanceUID": bad_instance, "StudyInstanceUID": bad_study}
    blob = pydicom.dcmread(router.blobs.path_for(rows[0]["sha256"]))
    assert (blob.SOPInstanceUID, blob.StudyInstanceUID) == (new_instance, new_study)
    assert blob.file_meta.MediaStorageSOPInstanceUID == new_instance
    assert blob.PixelData == ds.PixelData and blob.PatientName == ds.PatientName
    index = router.view_db("studies").query(
        "SELECT study_instance_uid FROM instances WHERE sop_instance_uid = ?", (new_instance,))
    assert [r["study_instance_uid"] for r in index] == [new_study]
    delivered = wait_for(lambda: list((tmp_path / "repair" / "archive").rglob("*.dcm")), 20,
                         "the repaired object to be delivered")
    assert [p.read_bytes() for p in delivered] == [
        router.blobs.path_for(rows[0]["sha256"]).read_bytes()]


@pytest.mark.parametrize("where", ["receiver", "handler"])
def test_a_dataset_that_exhausts_the_stack_or_memory_is_0xc000_not_a700(
        tmp_path: Path, start_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    """Whatever still gives out on an object is the object's fault: never "retry later"."""
    from router.application import receive

    router = start_router(settings_for(tmp_path))
    path = tmp_path / "ok.dcm"
    write(path, b"")

    def exhausted(*_: Any, **__: Any) -> Any:
        raise RecursionError if where == "receiver" else MemoryError

    if where == "receiver":  # while the dataset is read: refused and recorded
        monkeypatch.setattr(receive, "scan_header", exhausted)
    else:  # anywhere else in the C-STORE handler: its last resort answers
        monkeypatch.setattr(receive.Receiver, "receive", exhausted)
    assert c_store(router.dicom.port, [path]) == [0xC000]
    if where == "receiver":
        assert [f["reason"] for f in failures(router)] == [
            "dataset could not be parsed: RecursionError"]
