"""Faults on the receive and delivery paths, with real peers: a full disk, objects that are not
DICOM, hostile header values, a destination that is down, duplicates, unknown calling AEs and
a view rebuild that must reproduce the live tables exactly.

Each test runs an in-process router (``start_router``) and talks to it over real sockets with
pynetdicom or DCMTK; destinations are a folder, DCMTK ``storescp`` and a moto S3 server.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from projections.positions import view_positions
from router.application.commands import Actor
from router.service import Router, open_all_views
from router.settings import Settings
from tests.conftest import make_settings, wait_for
from tests.integration.peers import free_port, is_listening, s3_server
from tests.synthetic import make_ct_series

pytestmark = pytest.mark.usefixtures("dcmtk")

ROUTER_AET = "DICOMROUTER"
MODALITY_AET = "MODALITY1"
STATUS_OUT_OF_RESOURCES = 0xA700
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# --------------------------------------------------------------------------- helpers




def jobs(router: Router, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Query the jobs view after forcing it up to date."""
    router.runner.catch_up()
    return router.view_db("jobs").query(sql, params)


def audit(router: Router, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(sql, params)


def c_store(port: int, paths: Sequence[Path], calling_aet: str = MODALITY_AET,
            stop_on_failure: bool = False) -> list[int]:
    """Send Part 10 files as they are (bytes after the file meta) on one association.

    Returns the exact DIMSE status of each C-STORE (-1 when no response came back).
    """
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in sorted({_context_of(p) for p in paths}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", port, ae_title=ROUTER_AET)
    assert assoc.is_established, "the router did not accept the association"
    statuses: list[int] = []
    try:
        for path in paths:
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
            if stop_on_failure and statuses[-1] != 0:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _context_of(path: Path) -> tuple[str, str]:
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def file_destination(name: str, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"name": name, "type": "file", "path": str(folder)}


def dicom_destination(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "dicom", "host": "127.0.0.1", "port": port,
            "ae_title": "STORESCP", "timeout": 5.0, **extra}


def route_all(*destinations: str) -> dict[str, Any]:
    return {"name": "everything", "destinations": list(destinations)}


def router_settings(tmp_path: Path, database_url: str, destinations: Sequence[dict[str, Any]],
                    **overrides: Any) -> Settings:
    names = [d["name"] for d in destinations]
    return make_settings(tmp_path, database_url, destinations=tuple(destinations),
                         rules=(route_all(*names),) if names else (), **overrides)


def fast_retries(settings: Settings, *delays: float) -> Settings:
    return replace(settings, dispatch=replace(settings.dispatch, retry_delays=tuple(delays),
                                              retry_every_after=delays[-1]))


def deliveries_done(router: Router, expected: int, destination: str) -> bool:
    rows = jobs(router, "SELECT count(*) AS n FROM deliveries WHERE destination = ?"
                        " AND status = 'delivered'", (destination,))
    return int(rows[0]["n"]) >= expected


def blob_names(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}


def spool_leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "spool").iterdir())


def garbage_file(folder: Path, name: str, payload: bytes) -> tuple[Path, str]:
    """A file with valid file meta (so an SCU can send it) followed by ``payload``."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    _, offset = _split(path)
    data = path.read_bytes()[:offset] + payload
    path.write_bytes(data)
    return path, uid


def _split(path: Path) -> tuple[Dataset, int]:
    from pynetdicom.dsutils import split_dataset

    return split_dataset(path)


def truncated_copy(source: Path, folder: Path, name: str, keep_fraction: float) -> tuple[Path, str]:
    """A real file with a new SOP Instance UID whose dataset is cut after ``keep_fraction``."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    _, offset = _split(path)
    data = path.read_bytes()
    path.write_bytes(data[: offset + int((len(data) - offset) * keep_fraction)])
    return path, uid


class DcmtkStoreScp:
    """storescp on a port chosen by the test (the destination is configured before it runs)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.log_path = folder.parent / f"storescp-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DcmtkStoreScp:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["storescp", "-v", "-aet", "STORESCP", "-od", str(self.folder), str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_for(lambda: is_listening(self.port) or self.process.poll() is not None, 10,
                 "storescp to listen")
        assert self.process.poll() is None, f"storescp exited: {self.log_path.read_text()}"
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def sop_uids(self) -> set[str]:
        found = set()
        for path in self.folder.iterdir():
            with contextlib.suppress(Exception):  # a file still being written
                found.add(sop_uid_of(path))
        return found


@pytest.fixture
def storescp_on() -> Iterator[Callable[[Path, int], DcmtkStoreScp]]:
    started: list[DcmtkStoreScp] = []

    def start(folder: Path, port: int) -> DcmtkStoreScp:
        scp = DcmtkStoreScp(folder, port).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# --------------------------------------------------------------------------- 1. disk full


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Iterator[Path]:
    """The router's data folder on a 2 MiB tmpfs (needs root; unmounted after the router)."""
    folder = tmp_path / "data"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail("this test needs to mount a 2 MiB tmpfs (run as root or with CAP_SYS_ADMIN):"
                    f" mount said: {result.stderr.strip() or result.returncode}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_store_answers_a700_when_disk_is_full(
    tmp_path: Path, tiny_data_dir: Path, start_router: Callable[..., Router]
) -> None:
    out = tmp_path / "archive"
    settings = router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                               [file_destination("archive", out)])
    assert settings.data_dir == tiny_data_dir
    router = start_router(settings)
    files = make_ct_series(tmp_path / "ct", count=40, rows=256, cols=256)  # 128 KiB each

    statuses = c_store(router.dicom.port, files, stop_on_failure=True)

    assert statuses[-1] == STATUS_OUT_OF_RESOURCES, f"statuses: {[hex(s) for s in statuses]}"
    acknowledged, refused = files[: len(statuses) - 1], files[len(statuses) - 1]
    assert len(acknowledged) >= 3, "the tmpfs should hold a few instances before it is full"
    assert all(s == 0 for s in statuses[:-1])
    refused_uid = sop_uid_of(refused)
    assert jobs(router, "SELECT job_id FROM jobs WHERE sop_instance_uid = ?", (refused_uid,)) == []
    failures = jobs(router, "SELECT status, reason FROM receipt_failures"
                            " WHERE sop_instance_uid = ?", (refused_uid,))
    assert [f["status"] for f in failures] == [STATUS_OUT_OF_RESOURCES]
    rows = audit(router, "SELECT outcome, detail FROM audit"
                         " WHERE action = 'ReceiptFailure.Recorded'")
    assert [r["outcome"] for r in rows] == ["failure"]
    assert json.loads(rows[0]["detail"])["status"] == STATUS_OUT_OF_RESOURCES
    assert spool_leftovers(tiny_data_dir) == []
    stored = jobs(router, "SELECT sha256, sop_instance_uid FROM jobs")
    assert blob_names(tiny_data_dir) == {r["sha256"] for r in stored}
    assert {r["sop_instance_uid"] for r in stored} == {sop_uid_of(p) for p in acknowledged}

    wait_for(lambda: deliveries_done(router, len(acknowledged), "archive"), 20,
             "acknowledged instances to be delivered")
    delivered = {sop_uid_of(p): p for p in out.rglob("*.dcm")}
    for source in acknowledged:
        copy = pydicom.dcmread(delivered[sop_uid_of(source)])
        assert copy.PixelData == pydicom.dcmread(source).PixelData


# --------------------------------------------------------------------------- 2. not DICOM


def test_non_dicom_and_truncated_files_get_failure_status_and_audit_row(
    tmp_path: Path, start_router: Callable[..., Router]
) -> None:
    out = tmp_path / "archive"
    router = start_router(router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                                          [file_destination("archive", out)]))
    bad = tmp_path / "bad"
    ct = Path(get_testdata_file("CT_small.dcm"))
    samples = [
        garbage_file(bad, "garbage.dcm", random.Random(7).randbytes(3000)),
        garbage_file(bad, "text.dcm", b"this is a text file, not a DICOM dataset\n" * 20),
        garbage_file(bad, "bad-length.dcm", b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" * 4),
        truncated_copy(ct, bad, "cut-in-header.dcm", 0.02),
        truncated_copy(ct, bad, "cut-in-pixels.dcm", 0.7),
        truncated_copy(Path(get_testdata_file("JPEG2000.dcm")), bad, "cut-in-fragments.dcm", 0.8),
    ]

    statuses = [c_store(router.dicom.port, [path])[0] for path, _ in samples]

    for (path, _), status in zip(samples, statuses, strict=True):
        assert 0xC000 <= status <= 0xCFFF or status == 0xA900, (
            f"{path.name} answered 0x{status:04X}")
    uids = [uid for _, uid in samples]
    assert jobs(router, "SELECT job_id FROM jobs") == []
    failures = jobs(router, "SELECT sop_instance_uid, status FROM receipt_failures")
    assert sorted(f["sop_instance_uid"] for f in failures) == sorted(uids)
    rows = audit(router, "SELECT outcome FROM audit WHERE action = 'ReceiptFailure.Recorded'")
    assert [r["outcome"] for r in rows] == ["failure"] * len(samples)
    assert blob_names(router.settings.data_dir) == set()
    assert spool_leftovers(router.settings.data_dir) == []
    studies = router.view_db("studies").query("SELECT sop_instance_uid FROM instances")
    assert studies == []


# --------------------------------------------------------------------------- 3. hostile values

HOSTILE = ["../../etc/x", "/abs/path", "..", "a/b\\c", "<script>alert(1)</script>"]


def hostile_instances(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI values we want
        for i, value in enumerate(HOSTILE):
            for field in ("SOPInstanceUID", "StudyInstanceUID", "PatientID"):
                if field == "SOPInstanceUID" and "\\" in value:
                    continue  # a backslash makes it multi-valued: no SCU can put it in a command
                # Deep copies: a shallow one shares the elements, and a value set here would
                # leak into every later instance.
                ds = copy.deepcopy(template)
                ds.SOPInstanceUID = generate_uid()
                ds.SeriesInstanceUID = generate_uid()
                setattr(ds, field, value)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = folder / f"hostile-{i}-{field}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


def test_hostile_uids_and_tag_values_never_escape_the_folder_or_prefix(
    tmp_path: Path, start_router: Callable[..., Router]
) -> None:
    import boto3

    out = tmp_path / "sandbox" / "archive"
    bucket, prefix = "hostile-values", "incoming/site1/"
    with s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket=bucket)
        bucket_dest = {"name": "cloud", "type": "s3", "bucket": bucket, "prefix": prefix,
                       "endpoint_url": endpoint, "access_key_id": "test",
                       "secret_access_key": "test"}
        router = start_router(router_settings(
            tmp_path, f"sqlite:///{tmp_path / 'db'}", [file_destination("archive", out),
                                                       bucket_dest]))
        paths = hostile_instances(tmp_path / "hostile")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            statuses = c_store(router.dicom.port, paths)
        # A hostile UID is no UID (PS3.5 9.1): refused with the reason recorded; other
        # hostile values are stored and delivered, and must not escape either.
        uid_fields = ("SOPInstanceUID", "StudyInstanceUID")
        refused = [p for p in paths if p.stem.endswith(uid_fields)]
        assert statuses == [0xC000 if p in refused else 0 for p in paths]
        reasons = jobs(router, "SELECT reason FROM receipt_failures")
        assert len(reasons) == len(refused)
        assert all(r["reason"].endswith("(PS3.5 9.1)") for r in reasons), reasons
        paths = [p for p in paths if p not in refused]
        wait_for(lambda: deliveries_done(router, len(paths), "archive")
                 and deliveries_done(router, len(paths), "cloud"), 30,
                 "every hostile instance to reach both destinations")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]

    written = [p for p in (tmp_path / "sandbox").rglob("*") if p.is_file()]
    assert len(written) == len(paths)
    root = out.resolve()
    for path in written:
        assert root in path.resolve().parents, f"{path} is outside {root}"
        assert not any(part in ("..", ".") for part in path.relative_to(out).parts)
    assert not (tmp_path / "etc").exists() and not Path("/abs/path").exists()
    assert len(keys) == len(paths)
    for key in keys:
        assert key.startswith(prefix), key
        assert not any(part in ("", ".", "..") for part in key.split("/")), key
        assert "\\" not in key and "<" not in key, key


# --------------------------------------------------------------------------- 4. destination down


def test_destination_down_then_up_delivers_everything_with_visible_retries(
    tmp_path: Path, start_router: Callable[..., Router],
    storescp_on: Callable[[Path, int], DcmtkStoreScp],
) -> None:
    port = free_port()
    # One association at a time: storescp serves one, and an idle one is held for a while.
    settings = router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                               [dicom_destination("pacs", port, timeout=2.0, concurrency=1)])
    # Two quick retries, then a long wait that only an operator's requeue cuts short.
    router = start_router(fast_retries(settings, 0.3, 0.3, 3600.0))
    files = make_ct_series(tmp_path / "ct", count=6, rows=64, cols=64)
    assert c_store(router.dicom.port, files) == [0] * len(files)

    def three_failures() -> list[dict[str, Any]]:
        rows = jobs(router, "SELECT job_id, status, attempts, last_error, next_attempt_at"
                            " FROM deliveries WHERE destination = 'pacs'")
        done = len(rows) == len(files) and all(r["attempts"] == 3 for r in rows)
        return rows if done else []

    rows = wait_for(three_failures, 20, "three failed attempts per delivery")
    assert {r["status"] for r in rows} == {"retrying"}
    assert all(r["last_error"] for r in rows)
    assert all(r["next_attempt_at"] > time.time() + 3000 for r in rows)
    failed = audit(router, "SELECT outcome FROM audit WHERE action = 'Delivery.AttemptFailed'")
    assert len(failed) == 3 * len(files) and {r["outcome"] for r in failed} == {"failure"}

    scp = storescp_on(tmp_path / "pacs", port)
    for row in rows:
        router.commands.requeue(row["job_id"], "pacs", Actor("tester"))

    wait_for(lambda: deliveries_done(router, len(files), "pacs"), 20,
             "every instance to reach the destination once it is up")
    wait_for(lambda: scp.sop_uids() == {sop_uid_of(p) for p in files}, 10,
             "storescp to hold every instance")
    rows = jobs(router, "SELECT attempts, status FROM deliveries")
    assert [(r["attempts"], r["status"]) for r in rows] == [(4, "delivered")] * len(files)
    requeued = audit(router, "SELECT actor FROM audit WHERE action = 'Delivery.Requeued'")
    assert [r["actor"] for r in requeued] == ["tester"] * len(files)


# --------------------------------------------------------------------------- 7. rebuild

VIEW_TABLES = {
    "jobs": {"jobs": "job_id", "deliveries": "delivery_id", "receipt_failures": "failure_id",
             "transfers": "transfer_id"},
    "studies": {"studies": "study_instance_uid", "series": "series_instance_uid",
                "instances": "sop_instance_uid"},
    "audit": {"audit": "application, position"},
}


def dump_views(settings: Settings) -> dict[str, Any]:
    views = open_all_views(settings)
    try:
        dump = {}
        for view, tables in VIEW_TABLES.items():
            db = views[view].db
            for table, key in tables.items():
                dump[table] = db.query(f"SELECT * FROM {table} ORDER BY {key}")
            dump[f"positions:{view}"] = view_positions(db, view)
        return dump
    finally:
        for handle in views.values():
            handle.db.close()


def write_cli_config(path: Path, settings: Settings) -> Path:
    path.write_text(
        "[server]\n"
        f'data_dir = "{settings.data_dir}"\n'
        f'database_url = "{settings.database_url}"\n'
        f'secret_key = "{settings.secret_key}"\n'
    )
    return path


def new_version_of(source: Path, folder: Path) -> Path:
    """Same SOP Instance UID, other content (a corrected description)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    ds.SeriesDescription = "CORRECTED"
    path = folder / f"v2-{source.name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rebuild_from_zero_gives_identical_tables(
    tmp_path: Path, database_url: str, start_router: Callable[..., Router]
) -> None:
    settings = fast_retries(router_settings(
        tmp_path, database_url,
        [file_destination("archive", tmp_path / "archive"), dicom_destination("dead", free_port())],
    ), 0.2, 3600.0)
    router = start_router(settings)
    files = make_ct_series(tmp_path / "ct", count=4, rows=64, cols=64)
    garbage, _ = garbage_file(tmp_path / "bad", "garbage.dcm", b"\x00garbage" * 100)
    sent = [*files, files[0], new_version_of(files[1], tmp_path / "v2"), garbage]
    statuses = c_store(router.dicom.port, sent)
    assert statuses[:-1] == [0] * 6 and statuses[-1] >= 0xC000

    def dead_twice() -> bool:
        rows = jobs(router, "SELECT attempts FROM deliveries WHERE destination = 'dead'")
        return len(rows) == 5 and all(r["attempts"] == 2 for r in rows)

    wait_for(lambda: deliveries_done(router, 5, "archive") and dead_twice(), 30,
             "deliveries to the archive and two failed attempts each to the dead peer")
    dead = jobs(router, "SELECT job_id FROM deliveries WHERE destination = 'dead'"
                        " ORDER BY job_id")
    router.commands.cancel(dead[0]["job_id"], "dead", Actor("tester"), reason="not needed")
    router.commands.requeue(dead[1]["job_id"], "dead", Actor("tester"))
    wait_for(lambda: jobs(router, "SELECT 1 FROM deliveries WHERE job_id = ? AND attempts = 3",
                          (dead[1]["job_id"],)), 10, "the requeued delivery to be attempted")
    router.stop()
    before = dump_views(settings)
    assert len(before["jobs"]) == 6 and len(before["receipt_failures"]) == 1
    assert {r["routing"] for r in before["jobs"]} == {"routed", "duplicate"}

    config = write_cli_config(tmp_path / "cli.toml", settings)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dicom-router"), "--config", str(config),
         "projections", "rebuild", "--all"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rebuilt ") == 3

    after = dump_views(settings)
    for table in before:
        assert after[table] == before[table], f"{table} differs after the rebuild"


# --------------------------------------------------------------------------- 8. duplicates


def test_duplicate_identical_is_recorded_not_redelivered(
    tmp_path: Path, database_url: str, start_router: Callable[..., Router],
    storescp_on: Callable[[Path, int], DcmtkStoreScp],
) -> None:
    port = free_port()
    scp = storescp_on(tmp_path / "pacs", port)
    router = start_router(router_settings(tmp_path, database_url,
                                          [dicom_destination("pacs", port, concurrency=1)]))
    original, marker = make_ct_series(tmp_path / "ct", count=2, rows=64, cols=64)
    assert c_store(router.dicom.port, [original]) == [0]
    wait_for(lambda: deliveries_done(router, 1, "pacs"), 20, "the first delivery")

    assert c_store(router.dicom.port, [original]) == [0]

    # An instance sent after the duplicate: once it is delivered, a wrong re-delivery of the
    # duplicate (queued before it) would have happened too.
    assert c_store(router.dicom.port, [marker]) == [0]
    wait_for(lambda: deliveries_done(router, 2, "pacs"), 20, "the marker's delivery")
    rows = jobs(router, "SELECT job_id, routing, duplicate_of, sha256 FROM jobs"
                        " ORDER BY received_at")
    assert [r["routing"] for r in rows] == ["routed", "duplicate", "routed"]
    assert rows[1]["duplicate_of"] == rows[0]["job_id"] and rows[1]["sha256"] == rows[0]["sha256"]
    deliveries = jobs(router, "SELECT job_id FROM deliveries ORDER BY created_at")
    assert [d["job_id"] for d in deliveries] == [rows[0]["job_id"], rows[2]["job_id"]]
    wait_for(lambda: scp.sop_uids() == {sop_uid_of(original), sop_uid_of(marker)}, 10,
             "storescp to hold the original and the marker")
    assert scp.log_path.read_text().count("Received Store Request") == 2
    recorded = audit(router, "SELECT outcome FROM audit WHERE action = 'Job.DuplicateIgnored'")
    assert [r["outcome"] for r in recorded] == ["success"]
    assert len(blob_names(router.settings.data_dir)) == 2


def test_same_uid_other_content_is_kept_as_new_version_and_routed(
    tmp_path: Path, database_url: str, start_router: Callable[..., Router]
) -> None:
    out = tmp_path / "archive"
    router = start_router(router_settings(tmp_path, database_url,
                                          [file_destination("archive", out)]))
    (original,) = make_ct_series(tmp_path / "ct", count=1, rows=64, cols=64)
    assert c_store(router.dicom.port, [original]) == [0]
    wait_for(lambda: deliveries_done(router, 1, "archive"), 20, "the first delivery")
    changed = new_version_of(original, tmp_path / "v2")

    assert c_store(router.dicom.port, [changed]) == [0]

    wait_for(lambda: deliveries_done(router, 2, "archive"), 20, "the new version's delivery")
    rows = jobs(router, "SELECT job_id, routing, previous_job_id, sha256 FROM jobs"
                        " ORDER BY received_at")
    assert [r["routing"] for r in rows] == ["routed", "routed"]
    assert rows[1]["previous_job_id"] == rows[0]["job_id"]
    assert rows[0]["sha256"] != rows[1]["sha256"]
    assert blob_names(router.settings.data_dir) == {r["sha256"] for r in rows}
    (delivered,) = out.rglob("*.dcm")
    assert hashlib.sha256(delivered.read_bytes()).hexdigest() == rows[1]["sha256"]
    assert pydicom.dcmread(delivered).SeriesDescription == "CORRECTED"
    added = audit(router, "SELECT 1 FROM audit WHERE action = 'Instance.VersionAdded'")
    assert len(added) == 1
    instance = router.view_db("studies").query("SELECT job_id, sha256 FROM instances")
    assert instance == [{"job_id": rows[1]["job_id"], "sha256": rows[1]["sha256"]}]


def test_same_uid_other_content_under_keep_first_is_stored_not_routed(
    tmp_path: Path, database_url: str, start_router: Callable[..., Router]
) -> None:
    out = tmp_path / "archive"
    settings = router_settings(tmp_path, database_url, [file_destination("archive", out)])
    settings = replace(settings, ingest=replace(settings.ingest,
                                                changed_duplicate_policy="keep_first"))
    router = start_router(settings)
    (original,) = make_ct_series(tmp_path / "ct", count=1, rows=64, cols=64)
    assert c_store(router.dicom.port, [original]) == [0]
    changed = new_version_of(original, tmp_path / "v2")

    assert c_store(router.dicom.port, [changed]) == [0]

    wait_for(lambda: len(jobs(router, "SELECT 1 FROM jobs WHERE routing = 'conflict'")) == 1,
             20, "the conflicting receipt to be recorded")
    wait_for(lambda: deliveries_done(router, 1, "archive"), 20, "the original's delivery")
    rows = jobs(router, "SELECT job_id, routing, duplicate_of FROM jobs ORDER BY received_at")
    assert [r["routing"] for r in rows] == ["routed", "conflict"]
    assert rows[1]["duplicate_of"] == rows[0]["job_id"]
    assert len(jobs(router, "SELECT 1 FROM deliveries")) == 1  # the conflict is not routed
    assert len(blob_names(router.settings.data_dir)) == 2  # but its bytes are kept


def test_the_same_new_uid_on_two_associations_at_once_makes_one_instance(
    tmp_path: Path, database_url: str, start_router: Callable[..., Router]
) -> None:
    """The first save of a UID assumes it is new; the loser of the race must reload and be
    recorded as a duplicate, not fail or make a second Instance."""
    router = start_router(router_settings(tmp_path, database_url,
                                          [file_destination("archive", tmp_path / "out")]))
    files = make_ct_series(tmp_path / "ct", count=20, rows=32, cols=32)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: c_store(router.dicom.port, files), range(2)))
    assert results == [[0] * 20, [0] * 20]
    wait_for(lambda: len(jobs(router, "SELECT 1 FROM jobs WHERE routing IS NOT NULL")) == 40,
             20, "all 40 receipts in the jobs view")
    rows = jobs(router, "SELECT routing, count(*) AS n FROM jobs GROUP BY routing")
    assert {r["routing"]: r["n"] for r in rows} == {"routed": 20, "duplicate": 20}
    wait_for(lambda: deliveries_done(router, 20, "archive"), 30, "20 deliveries")
    assert len(jobs(router, "SELECT 1 FROM deliveries")) == 20


# --------------------------------------------------------------------------- 9. unknown AE


def test_unknown_calling_ae_is_rejected_when_only_known_aes_are_allowed(
    tmp_path: Path, start_router: Callable[..., Router]
) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    settings = replace(settings, dicom=replace(settings.dicom, require_known_calling_ae=True,
                                               known_calling_aets=(MODALITY_AET,)))
    router = start_router(settings)
    port = str(router.dicom.port)
    (instance,) = make_ct_series(tmp_path / "ct", count=1, rows=32, cols=32)

    def dcmtk(tool: str, aet: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, "-v", "-aet", aet, "-aec", ROUTER_AET, "127.0.0.1", port,
                               *args], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)

    for tool, args in (("echoscu", ()), ("storescu", (str(instance),))):
        refused = dcmtk(tool, "INTRUDER", *args)
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, output
        assert "Association Rejected" in output, output
        assert "Calling AE Title Not Recognized" in output, output
    assert jobs(router, "SELECT 1 FROM jobs") == []

    for tool, args in (("echoscu", ()), ("storescu", (str(instance),))):
        accepted = dcmtk(tool, MODALITY_AET, *args)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    rows = jobs(router, "SELECT calling_aet FROM jobs")
    assert [r["calling_aet"] for r in rows] == [MODALITY_AET]


# --------------------------------------------------------------------------- database down


@pytest.mark.postgres
def test_store_answers_a700_when_the_database_is_unavailable(
    tmp_path: Path, pg_url: str, start_router: Callable[..., Router]
) -> None:
    """PostgreSQL refusing connections: 0xA700, no blob kept; once it is back, all is well."""
    import psycopg

    name = pg_url.rsplit("/", 1)[1]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    router = start_router(router_settings(tmp_path, pg_url,
                                          [file_destination("archive", tmp_path / "archive")]))
    before, during, after = make_ct_series(tmp_path / "ct", count=3, rows=64, cols=64)
    assert c_store(router.dicom.port, [before]) == [0]

    def cut_off(allow: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    cut_off(allow=False)
    # Past the once-a-second refresh of the retrieve-job lookup each C-STORE makes: that read
    # fails too and must not turn the answer into pynetdicom's 0xC211 (a CI run caught it).
    time.sleep(1.2)
    try:
        assert c_store(router.dicom.port, [during]) == [STATUS_OUT_OF_RESOURCES]
        assert list(router.blobs.spool_dir.iterdir()) == []
        blobs = {p.name for p in router.blobs.blob_dir.rglob("*") if p.is_file()}
        assert hashlib.sha256(during.read_bytes()).hexdigest() not in blobs
    finally:
        cut_off(allow=True)

    # Senders retry: after a failed save the router refuses at once for a few seconds.
    wait_for(lambda: c_store(router.dicom.port, [during]) == [0], 30,
             "the router to accept again once the database is back")
    assert c_store(router.dicom.port, [after]) == [0]
    wait_for(lambda: deliveries_done(router, 3, "archive"), 30,
             "every acknowledged instance to be delivered once the database is back")
    uids = {r["sop_instance_uid"] for r in jobs(router, "SELECT sop_instance_uid FROM jobs")}
    assert uids == {sop_uid_of(p) for p in (before, during, after)}


def test_a_receipt_whose_log_cannot_be_synced_is_kept_but_not_acknowledged(
    tmp_path: Path, start_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite: the commit went through but the WAL sync failed (EIO). The sender is told
    0xA700; the job stays, with its object, and is delivered; the resend is a duplicate. The
    log says why it was not acknowledged."""
    out = tmp_path / "out"
    router = start_router(router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                                          [file_destination("archive", out)]))
    (source,) = make_ct_series(tmp_path / "ct", count=1, rows=64, cols=64)
    real_fdatasync = os.fdatasync
    failing = threading.Event()

    def fdatasync(fd: int) -> None:
        if failing.is_set() and os.readlink(f"/proc/self/fd/{fd}").endswith("ingest.sqlite-wal"):
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    failing.set()
    assert c_store(router.dicom.port, [source]) == [STATUS_OUT_OF_RESOURCES]
    failing.clear()
    assert any("receipt not known to be durable ([Errno 5] WAL sync failed" in r.getMessage()
               for r in caplog.records)
    wait_for(lambda: deliveries_done(router, 1, "archive"), 20, "the committed job's delivery")
    time.sleep(5.1)  # the receiver refuses at once for 5 s after a failed save
    assert c_store(router.dicom.port, [source]) == [0]
    rows = jobs(router, "SELECT routing FROM jobs ORDER BY received_at")
    assert [r["routing"] for r in rows] == ["routed", "duplicate"]
    assert len(list(out.rglob("*.dcm"))) == 1


def test_sessions_ended_by_the_server_fail_no_store(
    tmp_path: Path, pg_url: str, start_router: Callable[..., Router]
) -> None:
    """PostgreSQL ends every session of the router (a restart, an administrator): the next
    C-STOREs are answered 0x0000 on new connections, with no test query before each save."""
    import psycopg

    name = pg_url.rsplit("/", 1)[1]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    router = start_router(router_settings(tmp_path, pg_url,
                                          [file_destination("archive", tmp_path / "archive")]))
    files = make_ct_series(tmp_path / "ct", count=4, rows=64, cols=64)
    assert c_store(router.dicom.port, files[:1]) == [0]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        ended = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s AND pid <> pg_backend_pid()",
                             (name,)).fetchall()
    assert ended
    assert c_store(router.dicom.port, files[1:]) == [0, 0, 0]
    wait_for(lambda: deliveries_done(router, 4, "archive"), 30,
             "every instance delivered after the sessions ended")
