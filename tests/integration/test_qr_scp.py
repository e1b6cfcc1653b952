"""The router as a query/retrieve node, driven by DCMTK: findscu (Patient and Study Root, all
levels, UTF-8 and Latin-1 names, C-CANCEL), movescu (to a known remote node, an unknown one,
with failed sub-operations) and getscu; refusals of unknown calling AEs; access records.
The core runs on SQLite and PostgreSQL, and C-FIND also in a receiver process.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from router.application.commands import Actor
from tests.conftest import make_settings, wait_for
from tests.integration.peers import StoreScp

pytestmark = pytest.mark.dcmtk
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
TOOL = "QRSCU"  # the AE title the DCMTK tools call from (a remote node of the router)


@dataclass(frozen=True)
class Study:
    uid: str
    patient_id: str
    files: list[Path]

    def instance_uids(self) -> set[str]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in self.files}


def write_study(folder: Path, *, patient_id: str, patient_name: str, charset: str,
                study_date: str, modalities: tuple[str, ...] = ("CT",), per_series: int = 2,
                description: str = "", accession: str = "") -> Study:
    """A small study (8x8 pixels), one series per modality, names in ``charset``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, files = generate_uid(), []
    for number, modality in enumerate(modalities, start=1):
        series_uid = generate_uid()
        for index in range(per_series):
            sop_class = CTImageStorage if modality == "CT" else MRImageStorage
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.SpecificCharacterSet = charset
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, "19700101"
            ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, study_date, "101500"
            ds.StudyDescription, ds.AccessionNumber = description, accession
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, number, modality
            ds.InstanceNumber = index + 1
            ds.Rows = ds.Columns = 8
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = (np.arange(64, dtype="<u2") + index).tobytes()
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return Study(study_uid, patient_id, files)


def storescu(port: int, files: list[Path]) -> None:
    result = subprocess.run(["storescu", "-aet", TOOL, "-aec", "DICOMROUTER", "127.0.0.1",
                             str(port), *map(str, files)], env=DCMTK_ENV, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def query_file(folder: Path, charset: str | None = None, **keys: Any) -> Path:
    """A query dataset for findscu/movescu/getscu, encoded in ``charset`` like a real SCU."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"query-{len(list(folder.glob('query-*')))}.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def run_tool(tool: str, port: int, options: list[str], files: list[Path], aet: str = TOOL,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A DCMTK tool calling the router from ``aet`` (verbose, Nagle off)."""
    argv = [tool, "-v", "-aet", aet, "-aec", "DICOMROUTER", *options, "127.0.0.1", str(port),
            *map(str, files)]
    return subprocess.run(argv, env=DCMTK_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, errors="replace", timeout=timeout,
                          check=False)


def findscu(port: int, out: Path, query: Path, *flags: str, aet: str = TOOL) -> list[Dataset]:
    """The C-FIND responses findscu received (extracted as files), in order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    result = run_tool("findscu", port, [*flags, "-X", "-od", str(out)], [query], aet=aet)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def final_response(output: str) -> dict[str, int]:
    """Status and sub-operation counts of the last response in a DCMTK tool's -d output."""
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", output)
    assert statuses, output
    final = {"status": int(statuses[-1], 16)}
    for name in ("Remaining", "Completed", "Failed", "Warning"):
        counts = re.findall(rf"{name} Suboperations\s*:\s*(\d+)", output)
        if counts:
            final[name.lower()] = int(counts[-1])
    return final


@pytest.fixture
def node(tmp_path: Path, start_router: Callable[..., Any]) -> Callable[..., Any]:
    """Start a router with the DCMTK tools' AE as a remote node; returns the router."""

    def start(database_url: str, **dicom: Any) -> Any:
        settings = make_settings(tmp_path, database_url)
        settings = replace(settings, dicom=replace(settings.dicom, **dicom))
        router = start_router(settings)
        router.remote_nodes.put({"name": "tools", "ae_title": TOOL, "host": "127.0.0.1",
                                 "port": 104}, Actor("test"))
        return router

    return start


def load(router: Any, port: int, studies: list[Study]) -> None:
    storescu(port, [f for s in studies for f in s.files])
    total = sum(len(s.files) for s in studies)
    db = router.view_db("studies")
    wait_for(lambda: db.query("SELECT count(*) AS n FROM instances")[0]["n"] == total, 20,
             "the studies view to index the loaded instances")


def accesses(router: Any, action: str, count: int) -> list[dict[str, Any]]:
    """The audit rows of ``action``, once there are ``count`` of them."""
    def rows() -> list[dict[str, Any]]:
        router.runner.wake()
        return router.view_db("audit").query(
            "SELECT actor, action, outcome, study_instance_uid, patient_id, detail FROM audit"
            " WHERE action = ? ORDER BY position", (action,))

    wait_for(lambda: len(rows()) >= count, 10, f"{count} {action} access records")
    return rows()


def three_studies(folder: Path) -> list[Study]:
    return [
        write_study(folder / "a", patient_id="P1", patient_name="DOE^JOHN",
                    charset="ISO_IR 192", study_date="20200115", modalities=("CT", "MR"),
                    description="CT chest", accession="ACC1"),
        write_study(folder / "b", patient_id="P2", patient_name="Müller^Hans",
                    charset="ISO_IR 100", study_date="20191231", modalities=("MR",)),
        write_study(folder / "c", patient_id="P3", patient_name="山田^太郎",
                    charset="ISO_IR 192", study_date="20210301", modalities=("CT",)),
    ]


def test_findscu_study_root_matching_and_character_sets(
        database_url: str, node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(database_url)
    port = router.dicom.port
    studies = three_studies(tmp_path / "data")
    load(router, port, studies)
    out = tmp_path / "rsp"

    def find(charset: str | None = None, **keys: Any) -> list[Dataset]:
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys}
        return findscu(port, out, query_file(tmp_path, charset, **keys), "-S")

    doe = find(PatientName="doe*", ModalitiesInStudy="", NumberOfStudyRelatedInstances="",
               StudyDescription="", PatientWeight="")
    assert [r.StudyInstanceUID for r in doe] == [studies[0].uid]
    assert list(doe[0].ModalitiesInStudy) == ["CT", "MR"]
    assert doe[0].NumberOfStudyRelatedInstances == 4 and doe[0].StudyDescription == "CT chest"
    assert "PatientWeight" in doe[0] and doe[0].RetrieveAETitle == "DICOMROUTER"
    in_range = find(StudyDate="20191201-20200131")
    assert sorted(r.StudyInstanceUID for r in in_range) == sorted([studies[0].uid, studies[1].uid])
    assert len(find(ModalitiesInStudy="MR")) == 2
    latin1 = find("ISO_IR 100", PatientName="Müller*", AccessionNumber="")
    assert [str(r.PatientName) for r in latin1] == ["Müller^Hans"]
    assert latin1[0].SpecificCharacterSet == "ISO_IR 100"
    utf8 = find("ISO_IR 192", PatientName="山田*")
    assert [str(r.PatientName) for r in utf8] == ["山田^太郎"]
    assert utf8[0].SpecificCharacterSet == "ISO_IR 192"
    series = findscu(port, out, query_file(
        tmp_path, QueryRetrieveLevel="SERIES", StudyInstanceUID=studies[0].uid,
        SeriesInstanceUID="", Modality="CT", NumberOfSeriesRelatedInstances=""), "-S")
    assert len(series) == 1 and series[0].NumberOfSeriesRelatedInstances == 2
    rows = accesses(router, "dimse.find", 6)
    assert len(rows) == 6 and {r["actor"] for r in rows} == {TOOL}
    assert {r["outcome"] for r in rows} == {"success"}
    assert rows[-1]["study_instance_uid"] == studies[0].uid


def test_findscu_patient_root_patient_and_image_levels(
        node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(f"sqlite:///{tmp_path / 'db'}")
    studies = three_studies(tmp_path / "data")
    load(router, router.dicom.port, studies)
    out = tmp_path / "rsp"
    patients = findscu(router.dicom.port, out, query_file(
        tmp_path, QueryRetrieveLevel="PATIENT", PatientID="P1", PatientName="",
        NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances=""), "-P")
    assert len(patients) == 1 and str(patients[0].PatientName) == "DOE^JOHN"
    assert patients[0].NumberOfPatientRelatedInstances == 4
    wanted = sorted(studies[0].instance_uids())[:2]
    images = findscu(router.dicom.port, out, query_file(
        tmp_path, QueryRetrieveLevel="IMAGE", PatientID="P1", StudyInstanceUID=studies[0].uid,
        SeriesInstanceUID="", SOPInstanceUID=wanted, SOPClassUID=""), "-P")
    assert sorted(r.SOPInstanceUID for r in images) == wanted
    assert all(r.PatientID == "P1" for r in images)


def test_c_cancel_stops_the_responses(node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(f"sqlite:///{tmp_path / 'db'}")
    study = write_study(tmp_path / "data", patient_id="P9", patient_name="MANY^IMAGES",
                        charset="ISO_IR 192", study_date="20220202", per_series=200)
    load(router, router.dicom.port, [study])
    query = query_file(tmp_path, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study.uid,
                       SeriesInstanceUID="", SOPInstanceUID="")
    out = tmp_path / "rsp"
    out.mkdir()
    result = run_tool("findscu", router.dicom.port, ["-d", "-S", "--cancel", "1", "-X", "-od",
                                                     str(out)], [query])
    assert result.returncode == 0, result.stdout
    assert final_response(result.stdout)["status"] == 0xFE00
    assert 1 <= len(list(out.glob("rsp*.dcm"))) < 200
    with StoreScp(tmp_path, ae_title="SINK") as sink:
        router.remote_nodes.put({"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                 "port": sink.port}, Actor("test"))
        study_query = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=study.uid)
        moved = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK", "--cancel",
                                                        "1"], [study_query])
        final = final_response(moved.stdout)
        assert final["status"] == 0xFE00 and 1 <= final["completed"] < 200


def test_unknown_calling_aes_are_refused_and_recorded(
        node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(f"sqlite:///{tmp_path / 'db'}")
    studies = three_studies(tmp_path / "data")
    load(router, router.dicom.port, studies)
    router.remote_nodes.put({"name": "finder", "ae_title": "FINDONLY", "host": "127.0.0.1",
                             "port": 104, "services": ["find"]}, Actor("test"))
    find = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    move = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=studies[0].uid)
    for aet in ("STRANGER", "FINDONLY"):
        refused = run_tool("findscu", router.dicom.port, ["-d", "-S"], [find], aet=aet)
        if aet == "STRANGER":
            assert final_response(refused.stdout)["status"] == 0x0124
        moved = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", TOOL], [move],
                         aet=aet)
        assert final_response(moved.stdout)["status"] == 0xC514  # refused: unable to process
        got = run_tool("getscu", router.dicom.port, ["-d", "-S", "-od", str(tmp_path)], [move],
                       aet=aet)
        assert final_response(got.stdout)["status"] == 0x0124
    denied = [r for a, n in (("dimse.find", 1), ("dimse.move", 2), ("dimse.get", 2))
              for r in accesses(router, a, n) if r["outcome"] == "denied"]
    assert len(denied) == 5 and {r["actor"] for r in denied} == {"STRANGER", "FINDONLY"}


def test_open_query_retrieve_answers_any_calling_ae(
        node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(f"sqlite:///{tmp_path / 'db'}", open_query_retrieve=True)
    load(router, router.dicom.port, three_studies(tmp_path / "data"))
    found = findscu(router.dicom.port, tmp_path / "rsp", query_file(
        tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=""), "-S", aet="ANYONE")
    assert len(found) == 3


def test_movescu_to_a_remote_node_and_to_an_unknown_destination(
        database_url: str, node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(database_url)
    studies = three_studies(tmp_path / "data")
    load(router, router.dicom.port, studies)
    with StoreScp(tmp_path, ae_title="SINK") as sink:
        router.remote_nodes.put({"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                 "port": sink.port}, Actor("test"))
        query = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=studies[0].uid)
        moved = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK"], [query])
        assert final_response(moved.stdout) == {"status": 0, "remaining": 0, "completed": 4,
                                                "failed": 0, "warning": 0}
        received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in sink.received()}
        assert received == studies[0].instance_uids()
        unknown = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "NOWHERE"],
                           [query])
        assert final_response(unknown.stdout)["status"] == 0xA801
    rows = accesses(router, "dimse.move", 2)
    assert [r["outcome"] for r in rows] == ["success", "denied"]
    assert rows[0]["study_instance_uid"] == studies[0].uid and "destination=SINK" in rows[0][
        "detail"]


def test_movescu_counts_failed_sub_operations(node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(f"sqlite:///{tmp_path / 'db'}")
    studies = three_studies(tmp_path / "data")
    load(router, router.dicom.port, studies)
    db = router.view_db("studies")
    with StoreScp(tmp_path, ae_title="SINK") as sink:
        router.remote_nodes.put({"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                 "port": sink.port}, Actor("test"))
        lost = db.query("SELECT sha256 FROM instances WHERE study_instance_uid = ? LIMIT 1",
                        (studies[0].uid,))[0]["sha256"]
        router.blobs.path_for(lost).unlink()
        query = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=studies[0].uid)
        partial = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK"], [query])
        assert final_response(partial.stdout) == {"status": 0xB000, "remaining": 0,
                                                  "completed": 3, "failed": 1, "warning": 0}
        for row in db.query("SELECT sha256 FROM instances WHERE study_instance_uid = ?",
                            (studies[1].uid,)):
            router.blobs.path_for(row["sha256"]).unlink()
        query = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=studies[1].uid)
        failed = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK"], [query])
        assert final_response(failed.stdout)["status"] == 0xA702
        assert final_response(failed.stdout)["failed"] == 2
        universal = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        refused = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK"],
                           [universal])
        assert final_response(refused.stdout)["status"] == 0xC514  # no unique key: refused
        universal_get = run_tool("getscu", router.dicom.port, ["-d", "-S", "-od", str(tmp_path)],
                                 [universal])
        assert final_response(universal_get.stdout)["status"] == 0xA900


def test_compressed_instances_are_decompressed_for_a_move_destination_that_wants_it(
        node: Callable[..., Any], tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    router = node(f"sqlite:///{tmp_path / 'db'}")
    rle = Path(str(get_testdata_file("MR_small_RLE.dcm", download=False)))
    result = subprocess.run(["storescu", "-xr", "-aet", TOOL, "-aec", "DICOMROUTER",
                             "127.0.0.1", str(router.dicom.port), str(rle)], env=DCMTK_ENV,
                            capture_output=True, check=False, timeout=60)
    assert result.returncode == 0
    original = pydicom.dcmread(rle)
    db = router.view_db("studies")
    wait_for(lambda: db.query("SELECT 1 FROM instances"), 20, "the RLE instance indexed")
    with StoreScp(tmp_path, ae_title="SINK") as sink:  # accepts uncompressed syntaxes only
        router.remote_nodes.put({"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                 "port": sink.port}, Actor("test"))
        query = query_file(tmp_path, QueryRetrieveLevel="STUDY",
                           StudyInstanceUID=original.StudyInstanceUID)
        moved = run_tool("movescu", router.dicom.port, ["-d", "-S", "-aem", "SINK"], [query])
        assert final_response(moved.stdout)["completed"] == 1
        received = pydicom.dcmread(sink.received()[0])
    assert not received.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(received.pixel_array, original.pixel_array)


def test_getscu_receives_the_study_on_its_own_association(
        database_url: str, node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(database_url)
    studies = three_studies(tmp_path / "data")
    load(router, router.dicom.port, studies)
    out = tmp_path / "got"
    out.mkdir()
    query = query_file(tmp_path, QueryRetrieveLevel="SERIES", StudyInstanceUID=studies[0].uid,
                       SeriesInstanceUID=str(pydicom.dcmread(studies[0].files[0])
                                             .SeriesInstanceUID))
    got = run_tool("getscu", router.dicom.port, ["-d", "-S", "-od", str(out)], [query])
    assert final_response(got.stdout)["status"] == 0
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert received == {str(pydicom.dcmread(p).SOPInstanceUID) for p in studies[0].files[:2]}
    rows = accesses(router, "dimse.get", 1)
    assert [r["actor"] for r in rows] == [TOOL] and "instances=2" in rows[0]["detail"]
    assert (rows[0]["study_instance_uid"], rows[0]["patient_id"]) == (studies[0].uid, "P1")


@pytest.mark.postgres
def test_c_find_is_answered_in_receiver_processes(
        pg_url: str, node: Callable[..., Any], tmp_path: Path) -> None:
    router = node(pg_url, processes=2)
    port = router.receivers._settings.dicom_port
    studies = three_studies(tmp_path / "data")
    load(router, port, studies)
    for _ in range(4):  # the supervisor alternates idle receivers: both processes answer
        found = findscu(port, tmp_path / "rsp", query_file(
            tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientID="P2"), "-S")
        assert [r.StudyInstanceUID for r in found] == [studies[1].uid]
    assert len(accesses(router, "dimse.find", 4)) == 4


def test_remote_nodes_declared_in_toml_are_applied_by_config(
        tmp_path: Path, start_router: Callable[..., Any]) -> None:
    from router.config_check import check_config

    config = tmp_path / "router.toml"
    config.write_text('[[remote_nodes]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\n'
                      'port = 104\nservices = ["find"]\n')
    assert check_config(config) == []
    url = f"sqlite:///{tmp_path / 'db'}"
    router = start_router(make_settings(tmp_path, url, config))
    node = router.remote_nodes.state.node("pacs")
    assert node.created_by == "config" and node.config.services == ("find",)
    router.remote_nodes.put({"name": "mine", "ae_title": "MINE", "host": "127.0.0.1",
                             "port": 11112}, Actor("admin"))
    router.stop()
    config.write_text('[[remote_nodes]]\nname = "other"\nae_title = "OTHER"\nhost = "h"\n'
                      'port = 104\n')
    router = start_router(make_settings(tmp_path, url, config))
    assert sorted(router.remote_nodes.state.nodes()) == ["mine", "other"]
    config.write_text('[[remote_nodes]]\nname = "bad"\nae_title = "A\\\\B"\nhost = "h"\n'
                      'port = 0\n[[remote_nodes]]\nname = "x"\nae_title = "OTHER"\nhost = "h"\n'
                      'port = 1\n[[remote_nodes]]\nname = "y"\nae_title = "OTHER"\nhost = "h"\n'
                      'port = 1\n')
    problems = check_config(config)
    assert problems == [
        "remote_nodes[0].ae_title: must be 1-16 printable ASCII characters, no backslash",
        "remote_nodes[0].port: must be between 1 and 65535, got 0",
        "remote_nodes[2].ae_title: AE title 'OTHER' is used by more than one remote node "
        "(also remote_nodes[1].ae_title)"]
