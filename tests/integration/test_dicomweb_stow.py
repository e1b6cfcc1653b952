"""STOW-RS against the running router: dicomweb-client stores every valid image file bundled
with pydicom; the instances take the C-STORE path (receipt and routing events, the user as
actor, source "stow") and reach a folder destination. Errors: 409 (study mismatch, all
refused), 400 (not DICOM, bad multipart: nothing stored), 415, 413, 202 for a mix; every
request leaves an access record.
"""

from __future__ import annotations

import io
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from router.dicom.header import read_header
from router.dicom.scp import TRANSFER_SYNTAXES
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.test_pipeline import ROUTER_REFUSES, check_latest_versions, content_key
from tests.web_harness import Browser, bearer
from web.dicomweb import multipart_in, stow

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT = TEST_FILES / "CT_small.dcm"
BOUNDARY = "stow-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def image_files() -> list[Path]:
    """Every image file bundled with pydicom that a DICOM sender could send us."""
    chosen = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if path.name in ROUTER_REFUSES:
            continue
        try:
            meta = read_file_meta_info(path)
            ds = pydicom.dcmread(path)
            read_header(path)
            ds.save_as(io.BytesIO())  # the client sends what pydicom writes of it
            sendable = ("PixelData" in ds and meta.get("TransferSyntaxUID") in TRANSFER_SYNTAXES
                        and ds.SOPClassUID in _STORAGE_CLASSES.values()
                        and meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID)
        except Exception:  # not parseable, truncated...: not something a sender sends
            sendable = False
        if sendable:
            chosen.append(path)
    return chosen


def start(web_router: Any, tmp_path: Path, database_url: str) -> Any:
    (tmp_path / "archive").mkdir()
    settings = replace(
        make_settings(tmp_path, database_url),
        destinations=({"name": "archive", "type": "file", "path": str(tmp_path / "archive")},),
        rules=({"name": "uploads from this host", "source_ip": ["127.0.0.1"],
                "destinations": ["archive"]},))
    return web_router(settings)


@pytest.fixture
def server(web_router: Any, tmp_path: Path) -> Any:
    return start(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")


@pytest.fixture
def auth(server: Any) -> dict[str, str]:
    return bearer(server.url, "admin", ADMIN_PASSWORD)


def multipart(*parts: tuple[str | None, bytes]) -> bytes:
    """A multipart/related body from (Content-Type or None, payload) pairs."""
    out = io.BytesIO()
    for content_type, payload in parts:
        out.write(f"--{BOUNDARY}\r\n".encode())
        if content_type is not None:
            out.write(f"Content-Type: {content_type}\r\n".encode())
        out.write(b"\r\n" + payload + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def post(server: Any, auth: dict[str, str], body: bytes | Iterator[bytes], path: str = "",
         content_type: str = MULTIPART) -> requests.Response:
    return requests.post(f"{server.url}/dicom-web/studies{path}", data=body, timeout=120,
                         headers={**auth, "Content-Type": content_type})


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_sop_class(path: Path, sop_class: str) -> bytes:
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dicom_bytes(ds)


def jobs(server: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    server.router.runner.catch_up()
    return list(server.router.view_db("jobs").query(sql, params))


def access_rows(server: Any) -> list[Any]:
    server.router.runner.catch_up()
    return list(server.router.view_db("audit").query(
        "SELECT * FROM audit WHERE action = 'study.store' ORDER BY occurred_at"))


def failures(dataset: Any) -> list[tuple[str, int]]:
    return [(str(item.ReferencedSOPInstanceUID), int(item.FailureReason))
            for item in dataset.get("FailedSOPSequence", [])]


def test_dicomweb_client_stores_every_pydicom_image_and_they_are_routed(
        web_router: Any, tmp_path: Path, database_url: str) -> None:
    server = start(web_router, tmp_path, database_url)
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    files = image_files()
    syntaxes = {str(read_file_meta_info(p).TransferSyntaxUID) for p in files}
    # CT, MR, RLE, JPEG baseline, JPEG 2000, JPEG-LS, big endian, multi-frame are all there.
    assert {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.2"} <= syntaxes
    assert {"CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"} <= {p.name for p in files}
    client = DICOMwebClient(url=f"{server.url}/dicom-web", headers=auth)

    result = client.store_instances([pydicom.dcmread(p) for p in files])

    referenced = result.ReferencedSOPSequence
    assert "FailedSOPSequence" not in result and len(referenced) == len(files)
    for item, path in zip(referenced, files, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        expected = (f"/dicom-web/studies/{study}/series/{series}/instances/"
                    f"{ds.SOPInstanceUID}") if study and series else None
        assert (item.get("RetrieveURL") or None) == expected  # type 2: empty without UIDs
    retrieved = requests.get(server.url + referenced[0].RetrieveURL, headers=auth, timeout=60)
    assert retrieved.status_code == 200  # the Retrieve URL leads to the instance (WADO-RS)
    rows = jobs(server, "SELECT source, actor, source_ip, calling_aet, routing FROM jobs")
    assert len(rows) == len(files)
    assert {(r["source"], r["actor"], r["source_ip"], r["calling_aet"]) for r in rows} == {
        ("stow", "admin", "127.0.0.1", "")}
    sent: dict[str, set[str]] = defaultdict(set)
    for path in files:
        uid, digest = content_key(path)
        sent[uid].add(digest)
    routed = sum(1 for r in rows if r["routing"] == "routed")
    assert routed >= sum(len(v) for v in sent.values())
    wait_for(lambda: len(jobs(server, "SELECT 1 FROM deliveries WHERE status = 'delivered'"))
             == routed, 120, "deliveries to the archive folder")
    in_folder = [content_key(p) for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    check_latest_versions(in_folder, sent)


def test_study_in_the_url_must_match_409(server: Any, auth: dict[str, str]) -> None:
    other_study = generate_uid()
    client = DICOMwebClient(url=f"{server.url}/dicom-web", headers=auth)
    with pytest.raises(requests.HTTPError) as raised:
        client.store_instances([pydicom.dcmread(CT)], study_instance_uid=other_study)
    assert raised.value.response.status_code == 409

    r = post(server, auth, multipart(("application/dicom", CT.read_bytes())), f"/{other_study}")
    assert r.status_code == 409 and r.headers["Content-Type"] == "application/dicom+json"
    body = pydicom.Dataset.from_json(r.json())
    ct_uid = str(pydicom.dcmread(CT).SOPInstanceUID)
    assert failures(body) == [(ct_uid, 0xA900)] and "ReferencedSOPSequence" not in body
    assert body.RetrieveURL == f"/dicom-web/studies/{other_study}"  # a path, as in QIDO
    assert jobs(server, "SELECT * FROM jobs") == []
    refused = jobs(server, "SELECT status, source, sop_instance_uid FROM receipt_failures")
    assert [(r["status"], r["source"]) for r in refused] == [(0xA900, "stow")] * 2

    study = str(pydicom.dcmread(CT).StudyInstanceUID)
    r = requests.post(f"{server.url}/dicom-web/studies/{study}", timeout=60,
                      data=multipart(("application/dicom", CT.read_bytes())),
                      headers={**auth, "Content-Type": MULTIPART,
                               "X-Forwarded-Prefix": "/router"})  # behind a reverse proxy
    assert r.status_code == 200
    assert pydicom.Dataset.from_json(r.json()).RetrieveURL == f"/router/dicom-web/studies/{study}"


def test_a_part_that_is_not_dicom_is_400_and_nothing_is_stored(
        server: Any, auth: dict[str, str]) -> None:
    ct = ("application/dicom", CT.read_bytes())
    for bad in [("text/plain", b"hello"), ("application/dicom", b"not a DICOM file" * 20),
                ("application/dicom", CT.read_bytes()[128:]),  # no preamble: not Part 10
                ("application/dicom", CT.read_bytes()[:100])]:
        r = post(server, auth, multipart(ct, bad))
        assert r.status_code == 400, (bad[0], r.text)
        assert "part 2" in r.json()["error"]["message"]
    assert jobs(server, "SELECT * FROM jobs") == []
    assert list(server.router.blobs.spool_dir.glob("*.part")) == []


@pytest.mark.parametrize("body", [
    b"no boundary at all",
    f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(),  # never closed
    f"--{BOUNDARY}--\r\n".encode(),  # no parts
    f"--{BOUNDARY}junk\r\n\r\nabc\r\n--{BOUNDARY}--".encode(),
    f"--{BOUNDARY}\r\nno colon here\r\n\r\nabc\r\n--{BOUNDARY}--".encode(),
])
def test_bad_multipart_is_400(server: Any, auth: dict[str, str], body: bytes) -> None:
    r = post(server, auth, body)
    assert r.status_code == 400, r.text
    assert list(server.router.blobs.spool_dir.glob("*.part")) == []


def test_multipart_edge_cases_that_are_valid(server: Any, auth: dict[str, str]) -> None:
    payload = CT.read_bytes()
    body = (b"a preamble the parser must skip\r\n"
            + f"--{BOUNDARY}  \r\n\r\n".encode()  # transport padding; no headers at all
            + payload + f"\r\n--{BOUNDARY}--\r\nan epilogue".encode())

    def dribble() -> Iterator[bytes]:  # boundaries split across reads
        for start in range(0, len(body), 7001):
            yield body[start:start + 7001]

    r = post(server, auth, dribble())
    assert r.status_code == 200, r.text
    r = post(server, auth, multipart(("application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                                      payload)),
             content_type=f'Multipart/Related; boundary="{BOUNDARY}"; type=application/dicom')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", [
    "application/dicom", "application/json", "multipart/form-data; boundary=x",
    'multipart/related; type="application/dicom+json"; boundary=x', "", "garbage"])
def test_other_media_types_are_415(server: Any, auth: dict[str, str], content_type: str) -> None:
    r = post(server, auth, CT.read_bytes(), content_type=content_type)
    assert r.status_code == 415, r.text


def test_a_mix_of_stored_and_refused_is_202(server: Any, auth: dict[str, str]) -> None:
    not_storage = with_sop_class(CT, "1.2.840.10008.5.1.4.1.2.2.1")  # a C-FIND model
    deflated = TEST_FILES / "image_dfl.dcm"
    truncated = TEST_FILES / "MR_truncated.dcm"
    r = post(server, auth, multipart(("application/dicom", CT.read_bytes()),
                                     ("application/dicom", not_storage),
                                     ("application/dicom", deflated.read_bytes()),
                                     ("application/dicom", truncated.read_bytes())))
    assert r.status_code == 202 and r.headers["Content-Type"] == "application/dicom+json"
    body = pydicom.Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [
        pydicom.dcmread(CT).SOPInstanceUID]
    uid = {p: str(read_file_meta_info(p).MediaStorageSOPInstanceUID)
           for p in (deflated, truncated)}
    not_storage_uid = str(pydicom.dcmread(io.BytesIO(not_storage)).SOPInstanceUID)
    assert failures(body) == [(not_storage_uid, 0x0122), (uid[deflated], 0xC122),
                              (uid[truncated], 0xC000)]
    refused = jobs(server, "SELECT status FROM receipt_failures ORDER BY failed_at")
    assert [r["status"] for r in refused] == [0x0122, 0xC122, 0xC000]
    # Every refusal alone: 409.
    r = post(server, auth, multipart(("application/dicom", deflated.read_bytes())))
    assert r.status_code == 409 and failures(pydicom.Dataset.from_json(r.json())) == [
        (uid[deflated], 0xC122)]


def test_access_is_recorded_for_every_request(server: Any, auth: dict[str, str]) -> None:
    ds = pydicom.dcmread(CT)
    post(server, auth, multipart(("application/dicom", CT.read_bytes())))
    post(server, auth, multipart(("application/dicom", CT.read_bytes())), f"/{generate_uid()}")
    post(server, auth, multipart(("text/plain", b"x")))
    post(server, auth, b"{}", content_type="application/json")
    rows = wait_for(lambda: (rows := access_rows(server)) and len(rows) >= 4 and rows, 10,
                    "four access rows")
    assert [(r["actor"], r["outcome"]) for r in rows] == [
        ("admin", "success"), ("admin", "failure"), ("admin", "failure"), ("admin", "failure")]
    assert rows[0]["study_instance_uid"] == ds.StudyInstanceUID
    assert rows[0]["patient_id"] == ds.PatientID
    assert "stored 1, failed 0" in rows[0]["detail"]
    assert "0xA900" in rows[1]["detail"] and "415" in rows[3]["detail"]


def test_permission_and_csrf(server: Any) -> None:
    users = server.router.users
    from router.application.commands import Actor

    users.add("rad", "radiologist", "a long enough password", Actor("admin"))
    body = multipart(("application/dicom", CT.read_bytes()))
    r = post(server, bearer(server.url, "rad", "a long enough password"), body)
    assert r.status_code == 403  # radiologists read studies; storing needs studies.store
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(server.url + "/dicom-web/studies", data=body,
                     headers={"Content-Type": MULTIPART})
    assert r.status_code == 200  # the cookie session sends its CSRF header
    browser.csrf = ""
    r = browser.post(server.url + "/dicom-web/studies", data=body,
                     headers={"Content-Type": MULTIPART})
    assert r.status_code == 403


def test_request_size_limit_is_413(server: Any, auth: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stow, "MAX_REQUEST_BYTES", 100_000)
    body = multipart(("application/dicom", CT.read_bytes()), ("application/dicom",
                                                              CT.read_bytes() + b"\0" * 80_000))
    assert post(server, auth, body).status_code == 413  # Content-Length says so at once
    r = post(server, auth, iter([body[i:i + 10_000] for i in range(0, len(body), 10_000)]))
    assert r.status_code == 413  # chunked: counted while streaming
    assert jobs(server, "SELECT * FROM jobs") == []
    assert list(server.router.blobs.spool_dir.glob("*.part")) == []


@pytest.fixture
def spool_files_made(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every spool file the multipart reader creates (the router runs in this process)."""
    made: list[Path] = []
    real = multipart_in.SpoolFile

    def counting(folder: Path) -> Any:
        spool = real(folder)
        made.append(spool.path)
        return spool

    monkeypatch.setattr(multipart_in, "SpoolFile", counting)
    return made


def test_too_many_parts_are_refused_before_any_file_is_written(
        server: Any, auth: dict[str, str], spool_files_made: list[Path]) -> None:
    """One part over the limit, each part tiny: 413, and not one spool file was created."""
    spool = server.router.blobs.spool_dir
    before = sorted(spool.iterdir())
    tiny = ("application/dicom", b"\0" * 16)
    body = multipart(*[tiny] * (stow.MAX_PARTS + 1))
    assert len(body) < 2_000_000  # bounded: about 10,000 parts of 80 bytes
    r = post(server, auth, body)
    assert r.status_code == 413 and "parts" in r.json()["error"]["message"]
    assert spool_files_made == [] and sorted(spool.iterdir()) == before
    assert jobs(server, "SELECT * FROM jobs") == []


def test_a_part_of_another_type_is_refused_before_any_file_is_written(
        server: Any, auth: dict[str, str], spool_files_made: list[Path]) -> None:
    parts = [("application/dicom", b"\0" * 200)] * 3_000
    parts[2_500] = ("text/html", b"<p>not an image</p>")
    r = post(server, auth, multipart(*parts))
    assert r.status_code == 400 and "part 2501 is text/html" in r.json()["error"]["message"]
    assert spool_files_made == []
    assert jobs(server, "SELECT * FROM jobs") == []


def test_a_body_bigger_than_the_scan_spills_to_disk_and_is_stored(
        server: Any, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        spool_files_made: list[Path]) -> None:
    """Past SCAN_BYTES the parts held so far are spooled and the rest streams: all stored."""
    monkeypatch.setattr(multipart_in, "SCAN_BYTES", 50_000)  # CT_small is 39 KiB
    instances = [with_sop_class(CT, str(pydicom.dcmread(CT).SOPClassUID)) for _ in range(4)]
    r = post(server, auth, multipart(*[("application/dicom", data) for data in instances]))
    assert r.status_code == 200, r.text
    assert len(spool_files_made) == 4 and len(r.json()["00081199"]["Value"]) == 4
    assert list(server.router.blobs.spool_dir.glob("*.part")) == []


class RssSampler:
    """The resident set size of this process (client and server) before and at its peak."""

    def __init__(self) -> None:
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_a_large_upload_streams_to_disk_with_flat_memory(server: Any,
                                                         auth: dict[str, str]) -> None:
    """A 150 MiB instance, sent chunked: the router's memory does not grow by its size."""
    frames, rows, cols = 600, 512, 512
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "STOW-BIG", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = b""  # its header is written below, the value streamed
    head = dicom_bytes(ds)[:-12]  # cut the empty PixelData element (tag, OB, 0, length 0)
    pixel_bytes = frames * rows * cols
    element = b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")

    def body() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        yield element
        chunk = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(pixel_bytes // len(chunk)):
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    with RssSampler() as rss:
        started = time.monotonic()
        r = post(server, auth, body())
        elapsed = time.monotonic() - started
    grown = rss.peak - rss.baseline
    assert r.status_code == 200, r.text
    assert grown < 100 * 1024 * 1024, f"peak memory grew by {grown >> 20} MiB"
    stored = jobs(server, "SELECT size FROM jobs WHERE sop_instance_uid = ?",
                  (str(ds.SOPInstanceUID),))
    assert stored[0]["size"] == len(head) + len(element) + pixel_bytes
    print(f"STOW of {pixel_bytes >> 20} MiB took {elapsed:.1f} s; peak memory +{grown >> 20} MiB")


def test_non_uid_study_in_url_is_400(server: Any, auth: dict[str, str]) -> None:
    body = multipart(("application/dicom", CT.read_bytes()))
    assert post(server, auth, body, "/1.2.abc").status_code == 400
    assert post(server, auth, body, "/" + "1." * 40 + "1").status_code == 400


def test_a_client_that_only_takes_xml_gets_406(server: Any, auth: dict[str, str]) -> None:
    body = multipart(("application/dicom", CT.read_bytes()))
    r = requests.post(f"{server.url}/dicom-web/studies", data=body, timeout=60, headers={
        **auth, "Content-Type": MULTIPART, "Accept": "application/dicom+xml"})
    assert r.status_code == 406
    r = requests.post(f"{server.url}/dicom-web/studies", data=body, timeout=60, headers={
        **auth, "Content-Type": MULTIPART,
        "Accept": "application/dicom+xml, application/dicom+json;q=0.5"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom+json"
