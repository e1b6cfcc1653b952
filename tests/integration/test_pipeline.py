"""The backbone end to end with real peers: DCMTK storescu sends every valid file bundled with
pydicom plus a synthetic 200-slice CT; the router delivers to a DCMTK storescp, a folder and
an S3 endpoint (moto over HTTP); delivered content is checked by SOP Instance UID and pixel
data hash, and the jobs view must agree. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import boto3
import pydicom
import pytest

from router.dicom.scp import TRANSFER_SYNTAXES
from tests.conftest import make_settings
from tests.integration.peers import StoreScp, s3_server
from tests.synthetic import make_ct_series

STORESCU_ENV = {**os.environ, "TCP_NODELAY": "1"}
# Files storescu itself refuses to send (truncated on purpose); the fault tests cover them.
UNSENDABLE = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
# storescu converts big endian to little endian on the way out and swaps 32-bit OW pixel data
# in 16-bit words, so what it sends differs from the file: leave those two out.
UNSENDABLE |= {"rtdose_expb.dcm", "rtdose_expb_1frame.dcm"}
# Files the router refuses by design (docs/security.md, section 4), with the reason.
ROUTER_REFUSES = {
    "bad_sequence.dcm": "its UIDs are 64 hexadecimal digits, not digits and dots",
    "explicit_VR-UN.dcm": "SOP Class UID written with VR UN",
    "rtdose_rle.dcm": "SOP Class UID written with VR UN",
    "rtdose_rle_1frame.dcm": "SOP Class UID written with VR UN",
}


def pydicom_files() -> list[Path]:
    """Every file bundled with pydicom that is a valid storage instance in a syntax we accept."""
    from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

    folders = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:  # the pydicom-data wheel: real files from many producers (US, RG, Siemens MR...)
        import data_store  # type: ignore[import-not-found]

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    chosen = []
    for path in sorted(p for folder in folders for p in folder.glob("*.dcm")):
        if path.name in UNSENDABLE or path.name in ROUTER_REFUSES:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ok = (ds.file_meta.TransferSyntaxUID in TRANSFER_SYNTAXES
                  and ds.SOPClassUID in _STORAGE_CLASSES.values() and ds.SOPInstanceUID)
        except Exception:
            ok = False
        if ok:
            chosen.append(path)
    assert len(chosen) > 100, "pydicom's bundled test files or pydicom-data were not found"
    return chosen


def content_key(path: Path) -> tuple[str, str]:
    """(SOP Instance UID, hash of the pixel data as decoded, or raw when not decodable)."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return str(ds.SOPInstanceUID), hashlib.sha256(ds.to_json().encode()).hexdigest()[:16]
    try:
        array = ds.pixel_array
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()  # big endian peers
    except Exception:
        data = bytes(ds.PixelData)
    return str(ds.SOPInstanceUID), hashlib.sha256(data).hexdigest()


# storescu proposes one compressed transfer syntax per association, chosen by a flag.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


# Files pydicom reads but DCMTK refuses as malformed (odd-length OW pixel data, SOP class
# only in the file meta): storescu will not send them, so they are not part of the test.
DCMTK_REFUSES = {"693_J2KI.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm", "SC_rgb_jpeg.dcm",
                 # pydicom-data: SOP class only readable as UN; a deliberately cut JPEG 2000
                 "explicit_VR-UN.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"}


def storescu_all(port: int, files: list[Path]) -> list[Path]:
    """Send each group of files with the storescu flag that proposes their transfer syntax.

    Returns the files storescu reported as stored; anything else it refused must be in
    DCMTK_REFUSES (so a new failure cannot hide).
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups[STORESCU_PROPOSE.get(ts, "-x=")].append(path)
    refused: set[str] = set()
    for flag, group in sorted(groups.items()):
        refused |= storescu(port, group, flag, halt=False)
    assert refused <= DCMTK_REFUSES, refused - DCMTK_REFUSES
    return [p for p in files if p.name not in refused]


def storescu(port: int, files: list[Path], flag: str = "-x=", halt: bool = True) -> set[str]:
    result = subprocess.run(
        ["storescu", "-R", flag, *([] if halt else ["-nh"]), "-aet", "CT_SCANNER",
         "-aec", "DICOMROUTER", "127.0.0.1", str(port), *map(str, files)],
        env=STORESCU_ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    refused = {Path(p).name for p in map(str, files)
               if any(p in line for line in result.stderr.splitlines()
                      if line.startswith(("E:", "W:", "F:")))}
    if halt:
        assert not refused, result.stderr[-2000:]
    return refused


def wait_delivered(router, expected: int, timeout: float = 180.0) -> list[dict]:
    db = router.view_db("jobs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db.query("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        if counts.get("delivered", 0) >= expected:
            return db.query("SELECT * FROM deliveries")
        assert not counts.get("dead"), db.query(
            "SELECT destination, last_error FROM deliveries WHERE status = 'dead' LIMIT 5")
        time.sleep(0.25)
    raise AssertionError(f"not delivered in time: {counts}")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_storescu_files_reach_storescp_folder_and_s3(tmp_path: Path, database_url: str,
                                                     start_router, dcmtk) -> None:
    files = pydicom_files()
    ct = make_ct_series(tmp_path / "ct", count=60, rows=128, cols=128)

    with StoreScp(tmp_path / "scp", extra_args=("+xa", "+uf")) as scp, s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        bucket = f"imaging-{uuid.uuid4().hex[:8]}"  # moto keeps buckets for the whole process
        s3.create_bucket(Bucket=bucket)
        (tmp_path / "archive").mkdir()
        settings = replace(make_settings(tmp_path, database_url), destinations=(
            {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": scp.port,
             "ae_title": "STORESCP", "concurrency": 1},  # storescp serves one association at a time
            {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
            {"name": "cloud", "type": "s3", "bucket": bucket, "prefix": "site-a/",
             "endpoint_url": endpoint, "region": "us-east-1", "access_key_id": "testing",
             "secret_access_key": "testing"},
        ), rules=({"name": "everything", "calling_aet": "CT_*",
                   "destinations": ["pacs", "archive", "cloud"]},))
        # Several bundled files share a SOP Instance UID with other content: they become
        # versions, each delivered in turn.
        router = start_router(settings)
        sent_files = storescu_all(router.dicom.port, files)
        storescu(router.dicom.port, ct)
        sent: dict[str, set[str]] = defaultdict(set)
        for path in [*sent_files, *ct]:
            uid, digest = content_key(path)
            sent[uid].add(digest)
        versions = sum(len(v) for v in sent.values())

        jobs = router.view_db("jobs")
        router.runner.catch_up()
        rows = jobs.query("SELECT routing, count(*) AS n FROM jobs GROUP BY routing")
        by_routing = {r["routing"]: r["n"] for r in rows}
        # One job per file sent; files with the same UID and other bytes are new versions.
        assert sum(by_routing.values()) == len(sent_files) + len(ct)
        routed = by_routing["routed"]
        assert routed + by_routing.get("duplicate", 0) == len(sent_files) + len(ct)
        assert routed >= versions
        deliveries = wait_delivered(router, 3 * routed)
        assert len(deliveries) == 3 * routed
        assert {d["status"] for d in deliveries} == {"delivered"}

        at_scp = [content_key(p) for p in scp.received()]
        assert len(at_scp) == routed
        assert set(at_scp) == {(u, h) for u, hs in sent.items() for h in hs}

        in_folder = [content_key(p) for p in (tmp_path / "archive").rglob("*") if p.is_file()]
        check_latest_versions(in_folder, sent)

        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket) for o in page.get("Contents", [])]
        assert all(k.startswith("site-a/") and ".." not in k.split("/") for k in keys)
        in_s3 = []
        for key in keys:
            target = tmp_path / "s3copy" / hashlib.sha1(key.encode()).hexdigest()
            target.parent.mkdir(exist_ok=True)
            s3.download_file(bucket, key, str(target))
            in_s3.append(content_key(target))
        check_latest_versions(in_s3, sent)


def check_latest_versions(found: list[tuple[str, str]], sent: dict[str, set[str]]) -> None:
    """Folder and bucket hold one object per UID (a new version replaces the file/key)."""
    assert sorted(uid for uid, _ in found) == sorted(sent)
    for uid, digest in found:
        assert digest in sent[uid]
