"""A router whose blob store is a bucket (moto over HTTP): storescu's study and a STOW-RS
instance land in the bucket under content-addressed keys; with the local cache wiped, WADO-RS
(instances and a thumbnail), C-GET, C-MOVE and a folder destination still get every object,
read back from the bucket; with the endpoint down a
C-STORE is refused, not acknowledged, and leaves nothing behind. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pynetdicom import AE

from router.application.commands import Actor
from router.settings import Settings
from tests.conftest import make_settings, wait_for
from tests.integration.peers import StoreScp, s3_server
from tests.integration.test_pipeline import storescu
from tests.integration.test_qr_scp import TOOL, final_response, query_file, run_tool
from tests.synthetic import make_ct_series
from tests.web_harness import WebServer, bearer

ADMIN_PASSWORD = "correct horse battery"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def bucket_on(endpoint: str) -> tuple[Any, str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    name = f"router-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    return s3, name


def s3_settings(tmp_path: Path, database_url: str, endpoint: str, bucket: str,
                **overrides: Any) -> Settings:
    settings = make_settings(tmp_path, database_url, **overrides)
    return replace(settings, storage=replace(
        settings.storage, backend="s3", bucket=bucket, prefix="router/", endpoint_url=endpoint,
        access_key_id="test", secret_access_key="test", cache_size=50 * 1000**2))


def bucket_keys(s3: Any, bucket: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def endpoint() -> Iterator[str]:
    with s3_server() as url:
        yield url


@pytest.mark.dcmtk
def test_a_study_is_stored_in_the_bucket_and_served_from_it_after_the_cache_is_wiped(
        tmp_path: Path, database_url: str, start_router: Any, endpoint: str, dcmtk: None
) -> None:
    s3, bucket = bucket_on(endpoint)
    archive = tmp_path / "archive"
    archive.mkdir()
    # Receiver processes on PostgreSQL (each makes its own S3 client), threads on SQLite.
    processes = 0 if database_url.startswith("sqlite") else 1
    settings = s3_settings(tmp_path, database_url, endpoint, bucket, destinations=(
        {"name": "archive", "type": "file", "path": str(archive)},),
        rules=({"name": "all", "destinations": ["archive"]},))
    settings = replace(settings, dicom=replace(settings.dicom, processes=processes))
    router = start_router(settings)
    router.commands.pause_destination("archive", Actor("test"))  # delivered after the wipe
    router.remote_nodes.put({"name": "tools", "ae_title": TOOL, "host": "127.0.0.1",
                             "port": 104}, Actor("test"))
    port = router.receivers.port if processes else router.dicom.port
    *ct, by_stow = make_ct_series(tmp_path / "ct", count=7, rows=64, cols=64)
    storescu(port, ct)
    sent = {str(ds.SOPInstanceUID): bytes(ds.PixelData) for ds in map(pydicom.dcmread, ct)}

    jobs = router.view_db("jobs")
    rows = wait_for(lambda: (r := jobs.query("SELECT sha256 FROM jobs")) and len(r) == 6 and r,
                    30, "six jobs")
    shas = {row["sha256"] for row in rows}
    assert bucket_keys(s3, bucket) == {f"router/{s[:2]}/{s[2:4]}/{s}" for s in shas}
    in_bucket = {}
    for sha in shas:
        body = s3.get_object(Bucket=bucket, Key=f"router/{sha[:2]}/{sha[2:4]}/{sha}")["Body"]
        data = body.read()
        assert hashlib.sha256(data).hexdigest() == sha
        ds = pydicom.dcmread(BytesIO(data))
        in_bucket[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
    assert in_bucket == sent
    assert not (settings.data_dir / "blobs").exists() or not any(
        (settings.data_dir / "blobs").iterdir())

    cache = settings.data_dir / "blob-cache"
    shutil.rmtree(cache)
    studies = router.view_db("studies")
    wait_for(lambda: studies.query("SELECT count(*) AS n FROM instances")[0]["n"] == 6, 20,
             "the studies view")

    server = WebServer(router)
    server.start()
    try:
        study = str(pydicom.dcmread(ct[0]).StudyInstanceUID)
        auth = bearer(server.url, "admin", ADMIN_PASSWORD)
        client = DICOMwebClient(url=server.url + "/dicom-web", headers=auth)
        retrieved = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
        assert {str(ds.SOPInstanceUID): bytes(ds.PixelData) for ds in retrieved} == sent
        assert len(list(cache.glob("??/??/*"))) == 6  # read back into the cache
        shutil.rmtree(cache)
        thumbnail = requests.get(f"{server.url}/dicom-web/studies/{study}/thumbnail",
                                 headers={**auth, "Accept": "image/png"}, timeout=60)
        assert thumbnail.status_code == 200 and thumbnail.content.startswith(b"\x89PNG")
        stowed = pydicom.dcmread(by_stow)
        client.store_instances([stowed])  # STOW-RS: acknowledged once in the bucket too
        sent[str(stowed.SOPInstanceUID)] = bytes(stowed.PixelData)
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 7, 10, "the STOW-RS object's key")
    finally:
        server.stop()

    shutil.rmtree(cache)
    out = tmp_path / "got"
    out.mkdir()
    query = query_file(tmp_path, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    got = run_tool("getscu", port, ["-d", "-S", "-od", str(out)], [query])
    assert final_response(got.stdout)["status"] == 0, got.stdout[-2000:]
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()} == set(sent)

    shutil.rmtree(cache)
    with StoreScp(tmp_path / "sink", ae_title="SINK") as sink:
        router.remote_nodes.put({"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                 "port": sink.port}, Actor("test"))
        moved = run_tool("movescu", port, ["-d", "-S", "-aem", "SINK"], [query])
        assert final_response(moved.stdout)["status"] == 0, moved.stdout[-2000:]
        assert {str(ds.SOPInstanceUID): bytes(ds.PixelData)
                for ds in map(pydicom.dcmread, sink.received())} == sent

    shutil.rmtree(cache)
    router.commands.pause_destination("archive", Actor("test"), paused=False)
    # Only finished files: the folder destination writes each to a ".tmp-*.part" file first
    # and renames it, and counting one in flight read it as it was renamed away.
    delivered = wait_for(lambda: len(files := [p for p in archive.rglob("*") if p.is_file()
                                               and not p.name.endswith(".part")])
                         == 7 and files, 60, "seven files in the archive folder")
    assert {str(ds.SOPInstanceUID): bytes(ds.PixelData)
            for ds in map(pydicom.dcmread, delivered)} == sent


def test_with_the_endpoint_down_a_c_store_is_refused_and_nothing_is_kept(
        tmp_path: Path, database_url: str, start_router: Any) -> None:
    server = s3_server()
    endpoint = server.__enter__()
    try:
        s3, bucket = bucket_on(endpoint)
        router = start_router(s3_settings(tmp_path, database_url, endpoint, bucket))
        first, second = make_ct_series(tmp_path / "ct", count=2, rows=32, cols=32)
        ae = AE(ae_title="CT_SCANNER")
        ae.add_requested_context(CT_STORAGE)
        assoc = ae.associate("127.0.0.1", router.dicom.port, ae_title="DICOMROUTER")
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(first)).Status == 0x0000
        assoc.release()
        assert len(bucket_keys(s3, bucket)) == 1
    finally:
        server.__exit__(None, None, None)  # the endpoint is gone

    assoc = ae.associate("127.0.0.1", router.dicom.port, ae_title="DICOMROUTER")
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(second))
    assoc.release()
    assert status.Status == 0xA700  # out of resources: the sender keeps it and retries

    refused = str(pydicom.dcmread(second).SOPInstanceUID)
    router.runner.catch_up()
    jobs = router.view_db("jobs")
    assert [r["sop_instance_uid"] for r in jobs.query("SELECT sop_instance_uid FROM jobs")] == [
        str(pydicom.dcmread(first).SOPInstanceUID)]
    assert refused not in str(jobs.query("SELECT * FROM jobs"))
    spool = router.settings.data_dir / "spool"
    assert [p.name for p in spool.iterdir() if p.suffix in (".ready", ".part")] == []
    failures = jobs.query("SELECT status, reason, sop_instance_uid FROM receipt_failures")
    assert [(f["status"], f["sop_instance_uid"]) for f in failures] == [(0xA700, refused)]
    assert "S3 blob store PutObject on bucket" in failures[0]["reason"] or \
        "S3 blob store HeadObject on bucket" in failures[0]["reason"]


def test_the_router_does_not_start_when_the_bucket_is_missing(
        tmp_path: Path, database_url: str, endpoint: str) -> None:
    from router.service import Router

    settings = s3_settings(tmp_path, database_url, endpoint, "no-such-bucket-here")
    with pytest.raises(ValueError, match="bucket no-such-bucket-here failed: not found"):
        Router.build(settings)
