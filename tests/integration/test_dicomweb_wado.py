"""WADO-RS and WADO-URI against the running router, fed by DCMTK storescu: every valid image
file bundled with pydicom (CT, MR, RLE, JPEG, JPEG 2000, JPEG-LS, big endian, implicit,
deflated, multi-frame) retrieved with dicomweb-client as stored and as Explicit VR Little
Endian, its metadata rebuilt with every BulkDataURI fetched, its frames and rendered images;
all compared with the original file by SOP Instance UID. Then series and study streams, the
metadata cache, Accept edge cases, errors, WADO-URI, thumbnails, the access log, PostgreSQL.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from projections.study_keys import series_key, study_key
from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.integration.test_pipeline import (
    DCMTK_REFUSES,
    ROUTER_REFUSES,
    STORESCU_PROPOSE,
    UNSENDABLE,
)
from tests.synthetic import make_ct_series, make_small_instances
from tests.web_harness import WebServer, bearer

pytestmark = pytest.mark.dcmtk
LE = "1.2.840.10008.1.2.1"
MEDIA = "application/dicom+json"
TRAILING_PADDING = 0xFFFCFFFC
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Bundled files that are not valid image instances, with the reason; every other file that
# has pixel data is sent and checked (the test fails if one goes missing).
NOT_VALID = {
    "badVR.dcm": "Number of Frames is '1A'",
    "meta_missing_tsyntax.dcm": "no transfer syntax in the file meta",
    "nested_priv_SQ.dcm": "no SOP class, no Bits Allocated",
    "ExplVR_BigEndNoMeta.dcm": "no file meta", "ExplVR_LitEndNoMeta.dcm": "no file meta",
    "no_meta.dcm": "no file meta", "rtstruct.dcm": "no file meta (not an image either)",
}
SKIPPED = {**NOT_VALID, **dict.fromkeys(UNSENDABLE - {"rtdose_expb.dcm",
                                                      "rtdose_expb_1frame.dcm"},
                                        "truncated"),
           **dict.fromkeys(DCMTK_REFUSES, "storescu refuses it"), **ROUTER_REFUSES}
# storescu proposes one transfer syntax per association; these keep the stored encoding.
FLAGS = {**STORESCU_PROPOSE, "1.2.840.10008.1.2.2": "-xb", "1.2.840.10008.1.2": "-xi"}


def image_files() -> list[Path]:
    chosen = []
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        if path.name in SKIPPED:
            continue
        ds = pydicom.dcmread(get_testdata_file(path.name, download=False))
        if "PixelData" in ds:
            chosen.append(path)
    assert len(chosen) >= 50
    return chosen


def send(port: int, files: list[Path]) -> None:
    """storescu, one association per transfer syntax (deflated files go as explicit LE)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups[FLAGS.get(ts, "-x=")].append(path)
    for flag, group in sorted(groups.items()):
        result = subprocess.run(
            ["storescu", "-R", flag, "-aet", "MODALITY", "-aec", "DICOMROUTER", "127.0.0.1",
             str(port), *map(str, group)], env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "E:" not in result.stderr, result.stderr[-2000:]


def rounds(files: list[Path]) -> list[list[Path]]:
    """Files sharing a SOP Instance UID are versions of one instance: send and check them one
    round at a time, so that each is checked while it is the stored version."""
    out: list[list[Path]] = []
    seen: dict[str, int] = defaultdict(int)
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if seen[uid] == len(out):
            out.append([])
        out[seen[uid]].append(path)
        seen[uid] += 1
    return out


@dataclass
class Wado:
    server: WebServer
    headers: dict[str, str]

    @property
    def client(self) -> DICOMwebClient:
        # Permissive: four of pydicom's JPEG-LS files have no study or series UID; the
        # router indexes each under UIDs derived from its SOP Instance UID.
        return DICOMwebClient(url=self.server.url + "/dicom-web", headers=self.headers,
                              permissive_uid=True)

    def get(self, path: str, accept: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        if accept is not None:
            headers["Accept"] = accept
        return requests.get(self.server.url + path, headers=headers, timeout=60, **kwargs)


def ids(ds: Dataset) -> tuple[str, str, str]:
    """Study, series and instance UIDs as the router indexes them (derived when missing)."""
    index = {k: ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID")}
    sop = str(ds.SOPInstanceUID)
    return study_key(index, sop)[0], series_key(index, sop), sop


def url_of(ds: Dataset) -> str:
    study, series, sop = ids(ds)
    return f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"


def decoded(ds: Dataset) -> np.ndarray | None:
    try:
        return ds.pixel_array
    except Exception:
        return None


IMAGE_PIXEL = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration",
               "NumberOfFrames")


def pixels_of(original: Dataset, pixel_bytes: bytes) -> np.ndarray:
    """The original's pixels decoded from little endian uncompressed bytes (pydicom decodes
    both sides: no byte-order logic of ours in the comparison)."""
    twin = Dataset()
    for keyword in IMAGE_PIXEL:
        if keyword in original:
            setattr(twin, keyword, original.data_element(keyword).value)  # type: ignore[union-attr]
    if original.file_meta.TransferSyntaxUID.is_compressed:  # decoded: RGB, interleaved
        if twin.SamplesPerPixel == 3:
            twin.PhotometricInterpretation = "RGB"
        twin.PlanarConfiguration = 0
    twin.file_meta = pydicom.dataset.FileMetaDataset()
    twin.file_meta.TransferSyntaxUID = LE
    twin.PixelData = bytes(pixel_bytes)
    twin["PixelData"].VR = "OW" if twin.BitsAllocated > 8 else "OB"
    return twin.pixel_array


def check_stored(w: Wado, original: Dataset, expected_ts: str) -> None:
    got = w.client.retrieve_instance(*ids(original), media_types=(("application/dicom", "*"),))
    assert got.file_meta.TransferSyntaxUID == expected_ts
    assert got.PixelData == original.PixelData
    assert differences(got, original) == []


def differences(one: Dataset, other: Dataset) -> list[str]:
    """Tags whose values differ (pixel data compared separately; storescu drops the trailing
    padding of CT_small.dcm on the way)."""
    tags = (set(one.keys()) | set(other.keys())) - {0x7FE00010, TRAILING_PADDING}
    return [f"{t}" for t in sorted(tags)
            if t not in one or t not in other or one[t].value != other[t].value]


def check_explicit(w: Wado, original: Dataset, pixels: np.ndarray | None) -> None:
    wanted = (("application/dicom", LE),)
    if pixels is None:
        with pytest.raises(requests.HTTPError) as caught:
            w.client.retrieve_instance(*ids(original), media_types=wanted)
        assert caught.value.response.status_code == 406
        return
    got = w.client.retrieve_instance(*ids(original), media_types=wanted)
    assert got.file_meta.TransferSyntaxUID == LE and got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, pixels)


def check_metadata(w: Wado, original: Dataset, pixels: np.ndarray | None) -> None:
    meta = w.client.retrieve_instance_metadata(*ids(original))
    fetched: list[str] = []

    def bulk(tag: str, vr: str, uri: str) -> bytes:
        fetched.append(tag)
        parts = w.client.retrieve_bulkdata(urljoin(w.server.url, uri))
        if tag == "7FE00010":
            check_pixel_bulk(original, parts, pixels)
            return b""
        assert len(parts) == 1
        return bytes(parts[0])

    assert meta["00083002"]["Value"] == [str(original.file_meta.TransferSyntaxUID)] or \
        original.file_meta.TransferSyntaxUID.name.startswith("Deflated")
    rebuilt = Dataset.from_json(meta, bulk_data_uri_handler=bulk)
    assert "7FE00010" in fetched
    for elem in little_endian(original):
        if elem.tag in (0x7FE00010, TRAILING_PADDING) or elem.tag.element == 0:
            continue
        assert elem.tag in rebuilt, elem.tag
        assert rebuilt[elem.tag].value == elem.value, elem.tag


def little_endian(original: Dataset) -> Dataset:
    """The original, written little endian by DCMTK's dcmconv (an independent encoder) when it
    is big endian: what the metadata's binary values must be."""
    if original.file_meta.TransferSyntaxUID.is_little_endian:
        return original
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "le.dcm"
        subprocess.run(["dcmconv", "+te", str(original.filename), str(target)], check=True,
                       capture_output=True, timeout=60)
        return pydicom.dcmread(target)


def check_pixel_bulk(original: Dataset, parts: list[bytes], pixels: np.ndarray | None) -> None:
    ts = original.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        frames = int(original.get("NumberOfFrames") or 1)
        assert parts == list(generate_frames(original.PixelData, number_of_frames=frames))
    else:
        (data,) = parts
        assert pixels is None or np.array_equal(pixels_of(original, data), pixels)


def check_frames(w: Wado, original: Dataset, pixels: np.ndarray | None) -> None:
    count = int(original.get("NumberOfFrames") or 1)
    numbers = list(range(1, count + 1))
    ts = original.file_meta.TransferSyntaxUID
    stored = w.client.retrieve_instance_frames(
        *ids(original), frame_numbers=numbers,
        media_types=(("application/octet-stream", "*"),))
    if ts.is_compressed:
        assert stored == list(generate_frames(original.PixelData, number_of_frames=count))
    elif pixels is not None:
        assert np.array_equal(pixels_of(original, b"".join(stored)), pixels)
    (last,) = w.client.retrieve_instance_frames(*ids(original), frame_numbers=[count])
    assert last == stored[-1]
    wanted = (("application/octet-stream", LE),)
    if pixels is None and ts.is_compressed:
        with pytest.raises(requests.HTTPError) as caught:
            w.client.retrieve_instance_frames(*ids(original), frame_numbers=[1],
                                              media_types=wanted)
        assert caught.value.response.status_code == 406
    elif pixels is not None:
        plain = w.client.retrieve_instance_frames(*ids(original), frame_numbers=numbers,
                                                  media_types=wanted)
        assert np.array_equal(pixels_of(original, b"".join(plain)), pixels)


def check_rendered(w: Wado, original: Dataset, pixels: np.ndarray | None) -> None:
    if pixels is None:
        r = w.get(url_of(original) + "/rendered", "image/jpeg")
        assert r.status_code == 406 and "decoded" in r.json()["error"]["message"]
        return
    image = w.client.retrieve_instance_rendered(*ids(original), media_types=("image/jpeg",))
    with Image.open(io.BytesIO(image)) as shown:
        assert shown.format == "JPEG" and shown.size == (original.Columns, original.Rows)
    count = int(original.get("NumberOfFrames") or 1)
    frame = w.client.retrieve_instance_frames_rendered(
        *ids(original), frame_numbers=[count], media_types=("image/png",))
    with Image.open(io.BytesIO(frame)) as shown:
        assert shown.format == "PNG" and shown.size == (original.Columns, original.Rows)


def check_file(w: Wado, path: Path) -> None:
    original = pydicom.dcmread(path)
    ts = original.file_meta.TransferSyntaxUID
    pixels = decoded(original)
    try:
        check_stored(w, original, LE if ts.name.startswith("Deflated") else ts)
        check_explicit(w, original, pixels)
        check_metadata(w, original, pixels)
        check_frames(w, original, pixels)
        check_rendered(w, original, pixels)
    except (AssertionError, requests.HTTPError) as exc:
        raise AssertionError(f"{path.name}: {exc}") from exc


def test_every_bundled_image_round_trips(web_router: Any, dcmtk: None) -> None:
    server = web_router()
    w = Wado(server, bearer(server.url, "admin", ADMIN_PASSWORD))
    files = image_files()
    checked = []
    for group in rounds(files):
        send(server.router.dicom.port, group)
        server.router.runner.catch_up()
        for path in group:
            check_file(w, path)
            checked.append(path.name)
    assert sorted(checked) == sorted(p.name for p in files)


@contextmanager
def started(tmp: Path, database_url: str) -> Iterator[Wado]:
    from router.service import Router

    router = Router.build(make_settings(tmp, database_url))
    router.start()
    server = WebServer(router)
    server.start()
    try:
        yield Wado(server, bearer(server.url, "admin", ADMIN_PASSWORD))
    finally:
        server.stop()
        router.stop()


def bundled(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


@dataclass
class Loaded:
    w: Wado
    ct: list[Path]  # one study: a CT series and an MR series
    mr: list[Path]
    many: list[Path]  # 120 small MR images, their own study (the metadata cache test)
    j2k: Path
    lossy: Path  # JPEG Extended 12-bit: no decoder here
    frames2: Path  # RLE, 2 frames
    sr: Path  # no pixel data

    def path(self, path: Path, suffix: str = "") -> str:
        return url_of(pydicom.dcmread(path, stop_before_pixels=True)) + suffix


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, dcmtk: None) -> Iterator[Loaded]:
    """One router for the module's read-only checks (SQLite)."""
    tmp = tmp_path_factory.mktemp("wado")
    with started(tmp, f"sqlite:///{tmp / 'db'}") as w:
        ct = make_ct_series(tmp / "ct", count=12, rows=32, cols=32, patient_id="WADO-1")
        study = str(pydicom.dcmread(ct[0]).StudyInstanceUID)
        mr = make_small_instances(tmp / "mr", count=3, rows=16, cols=16, study_uid=study,
                                  patient_id="WADO-1")
        many = make_small_instances(tmp / "many", count=120, rows=16, cols=16,
                                    patient_id="WADO-2")
        data = Loaded(w, ct, mr, many, bundled("JPEG2000.dcm"), bundled("JPEG-lossy.dcm"),
                      bundled("SC_rgb_rle_2frame.dcm"), bundled("test-SR.dcm"))
        send(w.server.router.dicom.port, [*ct, *mr, *many, data.j2k, data.lossy,
                                          data.frames2, data.sr])
        w.server.router.runner.catch_up()
        yield data


def by_uid(paths: list[Path]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}


def test_series_and_study_are_streamed_one_part_per_instance(loaded: Loaded) -> None:
    w, originals = loaded.w, by_uid(loaded.ct + loaded.mr)
    study, series, _ = ids(pydicom.dcmread(loaded.ct[0]))
    got = w.client.retrieve_series(study, series, media_types=(("application/dicom", "*"),))
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in loaded.ct)
    whole = w.client.retrieve_study(study)  # Explicit VR Little Endian, the default
    assert len(whole) == len(originals)
    for ds in whole:
        assert ds.PixelData == originals[ds.SOPInstanceUID].PixelData
        assert differences(ds, originals[ds.SOPInstanceUID]) == []
    raw = w.get(f"/dicom-web/studies/{study}", 'multipart/related; type="application/dicom"',
                stream=True)
    assert raw.headers["Transfer-Encoding"] == "chunked"
    assert raw.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    body = raw.content
    assert body.count(f"Content-Type: application/dicom; transfer-syntax={LE}\r\n".encode()
                      ) == len(originals)


def test_series_metadata_comes_from_the_cache_not_the_files(loaded: Loaded) -> None:
    w = loaded.w
    study, series, _ = ids(pydicom.dcmread(loaded.many[0]))
    path = f"/dicom-web/studies/{study}/series/{series}/metadata"
    first = w.get(path)
    assert first.status_code == 200 and first.headers["Content-Type"] == MEDIA
    datasets = first.json()
    assert sorted(ds["00080018"]["Value"][0] for ds in datasets) == sorted(by_uid(loaded.many))
    assert all(ds["7FE00010"]["BulkDataURI"].startswith(f"/dicom-web/studies/{study}/")
               for ds in datasets)
    cache = w.server.router.settings.data_dir / "cache" / "dicomweb-metadata-v1"
    entries = sorted(p.name for p in cache.rglob("*.json"))
    assert len(entries) >= 120 and all(re.fullmatch(r"[0-9a-f]{64}\.json", e) for e in entries)
    shutil.rmtree(cache)  # derived data: rebuilt on the next request
    assert w.get(path).content == first.content
    blobs = w.server.router.blobs
    view = w.server.router.view_db("studies")
    for row in view.query("SELECT sha256 FROM instances WHERE series_instance_uid = ?",
                          (series,)):
        blobs.path_for(row["sha256"]).unlink()
    assert w.get(path).content == first.content  # no stored file was read
    whole = w.get(f"/dicom-web/studies/{study}/metadata").json()
    assert len(whole) == 120
    one = w.get(loaded.path(loaded.ct[0], "/metadata")).json()
    assert len(one) == 1 and one[0]["00100020"]["Value"] == ["WADO-1"]


def part_headers(response: requests.Response) -> list[str]:
    return re.findall(r"\r?\n?--[0-9a-f]{32}\r\n(Content-Type: [^\r]*)\r\n",
                      response.content.decode("latin-1"))


def test_accept_parameters_lists_and_q_values(loaded: Loaded) -> None:
    w, j2k = loaded.w, loaded.path(loaded.j2k)
    stored = pydicom.dcmread(loaded.j2k).file_meta.TransferSyntaxUID  # JPEG 2000 (lossy)
    dicom = 'multipart/related; type="application/dicom"; transfer-syntax='
    for accept, sent in (
        (f"{dicom}{stored}; q=0.9, {dicom}{LE}; q=0.5", stored),
        (f"{dicom}{stored}; q=0.4, {dicom}{LE}; q=0.5", LE),
        (f'{dicom}"{LE}"', LE),
        ("multipart/related; type=application/dicom; transfer-syntax=*", stored),
        (f"{dicom}1.2.840.10008.1.2.4.50, */*; q=0.1", stored),
        ("*/*", stored),
    ):
        r = w.get(j2k, accept)
        assert r.status_code == 200, (accept, r.text)
        assert part_headers(r) == [f"Content-Type: application/dicom; transfer-syntax={sent}"]
    for accept, status in ((f"{dicom}1.2.840.10008.1.2.4.50", 406),
                           ("application/dicom", 406), ("application/json", 406),
                           (f"{dicom}{stored}; q=x", 400), ('multipart/related; type="a', 400)):
        r = w.get(j2k, accept)
        assert r.status_code == status and r.json()["error"]["message"], accept
    lossy = loaded.path(loaded.lossy)
    assert w.get(lossy, f"{dicom}{LE}").status_code == 406
    fallback = w.get(lossy, 'multipart/related; type="application/dicom"')  # no syntax named
    assert part_headers(fallback) == [
        "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.4.51"]


def test_frames_are_always_multipart_with_a_transfer_syntax_per_part(loaded: Loaded) -> None:
    w = loaded.w
    j2k = loaded.path(loaded.j2k, "/frames/1")
    stored = str(pydicom.dcmread(loaded.j2k).file_meta.TransferSyntaxUID)
    octets = "multipart/related; type=application/octet-stream"
    r = w.get(j2k, f"{octets}; transfer-syntax=*")  # what OHIF asks for
    assert r.headers["Content-Type"].startswith(
        'multipart/related; type="application/octet-stream"; boundary=')
    assert part_headers(r) == [f"Content-Type: application/octet-stream; transfer-syntax={stored}"]
    r = w.get(j2k, f'multipart/related; type="image/jp2"; transfer-syntax={stored}')
    assert part_headers(r) == [f"Content-Type: image/jp2; transfer-syntax={stored}"]
    assert w.get(j2k, 'multipart/related; type="image/jp2"').status_code == 406  # means .90
    assert w.get(j2k, 'multipart/related; type="image/jpeg"').status_code == 406
    r = w.get(j2k, octets)  # uncompressed by default
    assert part_headers(r) == [f"Content-Type: application/octet-stream; transfer-syntax={LE}"]
    assert w.get(j2k, "image/jp2").status_code == 406  # frames never come single-part
    both = w.get(loaded.path(loaded.frames2, "/frames/2,1"), f"{octets}; transfer-syntax=*")
    assert len(part_headers(both)) == 2
    metadata = loaded.path(loaded.j2k, "/metadata")
    assert w.get(metadata, "application/json").status_code == 200
    assert w.get(metadata, 'multipart/related; type="application/dicom+xml"').status_code == 406
    rendered = loaded.path(loaded.j2k, "/rendered")
    assert w.get(rendered, "image/gif").status_code == 406
    png = w.get(rendered, "image/gif", params={"accept": "image/png"})
    assert png.headers["Content-Type"] == "image/png" and png.content[:4] == b"\x89PNG"


@pytest.mark.parametrize(("suffix", "status", "message"), [
    ("/frames/0", 400, "start at 1"),
    ("/frames/1,a", 400, "frame numbers"),
    ("/frames/3", 404, "2 frame(s)"),
    ("/bulkdata/7FE00010/0", 400, "bulk data path"),
    ("/bulkdata/00291234", 404, "no binary value"),
    ("/rendered?window=a,b", 400, "window"),
    ("/rendered?window=40,0", 400, "window width"),
    ("/rendered?viewport=0,10", 400, "viewport"),
    ("/rendered?viewport=10,10,500,500,10,10", 400, "outside the image"),
    ("/rendered?quality=101", 400, "quality"),
    ("/rendered?annotation=patient&burn=1", 400, "burn"),
])
def test_bad_pixel_requests(loaded: Loaded, suffix: str, status: int, message: str) -> None:
    r = loaded.w.get(loaded.path(loaded.frames2, suffix))
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_unknown_objects_are_404_and_access_needs_the_permission(loaded: Loaded) -> None:
    w = loaded.w
    study, series, sop = ids(pydicom.dcmread(loaded.ct[0], stop_before_pixels=True))
    for path, word in (("/dicom-web/studies/1.2.3", "study"),
                       (f"/dicom-web/studies/{study}/series/1.2.3/metadata", "series"),
                       (f"/dicom-web/studies/{study}/series/{series}/instances/1.2.3/frames/1",
                        "instance"),
                       (f"/dicom-web/studies/1.2.3/series/{series}/instances/{sop}/rendered",
                        "study")):
        r = w.get(path)
        assert r.status_code == 404 and word in r.json()["error"]["message"], path
    sr = loaded.path(loaded.sr)
    assert w.get(sr + "/frames/1").status_code == 404
    assert w.get(sr + "/rendered").status_code == 406
    assert w.get(sr + "/thumbnail").status_code == 404
    assert requests.get(w.server.url + sr, timeout=30).status_code == 401
    users = w.server.router.users
    if users.get("wado-aud") is None:
        from router.application.commands import Actor

        users.add("wado-aud", "auditor", "a long enough password", Actor("admin"))
    auditor = bearer(w.server.url, "wado-aud", "a long enough password")
    assert w.get(sr + "/metadata", headers=auditor).status_code == 403


def wado_uri(w: Wado, path: Path, **params: str) -> requests.Response:
    study, series, sop = ids(pydicom.dcmread(path, stop_before_pixels=True))
    query = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    return w.get("/wado", params={**query, **params})


def image(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_wado_uri(loaded: Loaded) -> None:
    w = loaded.w
    original = pydicom.dcmread(loaded.j2k)
    plain = wado_uri(w, loaded.j2k, contentType="application/dicom")
    assert plain.headers["Content-Type"] == "application/dicom"
    got = pydicom.dcmread(io.BytesIO(plain.content))
    assert got.file_meta.TransferSyntaxUID == LE
    assert np.array_equal(got.pixel_array, original.pixel_array)
    stored = pydicom.dcmread(io.BytesIO(wado_uri(w, loaded.j2k, contentType="application/dicom",
                                                 transferSyntax="*").content))
    assert stored.PixelData == original.PixelData
    lossy = wado_uri(w, loaded.lossy, contentType="application/dicom")  # cannot decode: stored
    assert pydicom.dcmread(io.BytesIO(lossy.content)).file_meta.TransferSyntaxUID.is_compressed
    assert wado_uri(w, loaded.lossy, contentType="application/dicom",
                    transferSyntax=LE).status_code == 406
    shown = image(wado_uri(w, loaded.j2k, rows="64"))  # image/jpeg by default
    assert shown.format == "JPEG" and shown.height == 64
    assert image(wado_uri(w, loaded.frames2, contentType="image/png", frameNumber="2",
                          columns="50")).size == (50, 50)
    window = image(wado_uri(w, loaded.ct[0], contentType="image/png", windowCenter="40",
                            windowWidth="400", region="0,0,0.5,0.5"))
    assert window.size == (16, 16)
    assert wado_uri(w, loaded.sr).headers["Content-Type"] == "application/dicom"
    for params, status in (({"requestType": "WADOX"}, 400), ({"objectUID": ""}, 400),
                           ({"objectUID": "1.2.3"}, 404), ({"contentType": "text/html"}, 406),
                           ({"anonymize": "yes"}, 400), ({"frameNumber": "3"}, 400),
                           ({"windowCenter": "40"}, 400), ({"region": "0,0,2,1"}, 400)):
        r = wado_uri(w, loaded.frames2, **params)
        assert r.status_code == status and r.json()["error"]["message"], params
    assert wado_uri(w, loaded.lossy, contentType="image/jpeg").status_code == 406


def test_rendering_parameters_and_thumbnails(loaded: Loaded) -> None:
    w, ct = loaded.w, loaded.path(loaded.ct[5], "/rendered")
    soft = w.get(ct, params={"window": "40,400"}).content
    bone = w.get(ct, params={"window": "700,2000,linear-exact"}).content
    sigmoid = w.get(ct, params={"window": "40,400,sigmoid"}).content
    assert len({soft, bone, sigmoid}) == 3
    assert image(w.get(ct, params={"viewport": "64,64"})).size == (64, 64)
    assert image(w.get(ct, params={"viewport": "64,32,0,0,16,16"})).size == (32, 32)
    flipped = image(w.get(ct, "image/png", params={"viewport": "32,32,0,0,-32,32"}))
    upright = image(w.get(ct, "image/png"))
    assert np.array_equal(np.asarray(flipped), np.asarray(upright)[:, ::-1])
    small = w.get(ct, params={"quality": "5"}).content
    assert len(small) < len(w.get(ct, params={"quality": "95"}).content)
    study, series, _ = ids(pydicom.dcmread(loaded.ct[0], stop_before_pixels=True))
    for path in (f"/dicom-web/studies/{study}/thumbnail",
                 f"/dicom-web/studies/{study}/series/{series}/thumbnail",
                 loaded.path(loaded.ct[1], "/thumbnail"),
                 loaded.path(loaded.frames2, "/frames/2/thumbnail")):
        shown = image(w.get(path))
        assert shown.format == "JPEG" and max(shown.size) == 128
    assert image(w.get(loaded.path(loaded.j2k, "/thumbnail"), params={"viewport": "40,40"})
                 ).size[1] == 40


def test_bulk_data_uris_follow_the_reverse_proxy_prefix(loaded: Loaded) -> None:
    w = loaded.w
    (meta,) = w.get(loaded.path(loaded.frames2, "/metadata"),
                    headers={"X-Forwarded-Prefix": "/pacs/router"}).json()
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith("/pacs/router/dicom-web/studies/") and uri.endswith("/bulkdata/7FE00010")
    parts = w.client.retrieve_bulkdata(w.server.url + uri.removeprefix("/pacs/router"))
    original = pydicom.dcmread(loaded.frames2)
    assert parts == list(generate_frames(original.PixelData, number_of_frames=2))
    retrieve = w.get("/dicom-web/studies", params={"PatientID": "WADO-1"},
                     headers={"X-Forwarded-Prefix": "/pacs"}).json()
    assert retrieve[0]["00081190"]["Value"][0].startswith("/pacs/dicom-web/studies/")


def access_events(w: Wado) -> list[Any]:
    store = w.server.router.stores.access
    return [store.mapper.to_domain_event(n)
            for n in store.recorder.select_notifications(0, 100000)
            if n.topic.endswith("Access.Recorded")]


def test_every_retrieval_is_one_access_record_with_study_and_patient(loaded: Loaded) -> None:
    w = loaded.w
    study, series, sop = ids(pydicom.dcmread(loaded.ct[2], stop_before_pixels=True))
    before = len(access_events(w))
    base = loaded.path(loaded.ct[2])
    calls = [(base, "dicomweb.retrieve"), (base + "/metadata", "dicomweb.metadata"),
             (base + "/frames/1", "dicomweb.frames"),
             (base + "/bulkdata/7FE00010", "dicomweb.bulkdata"),
             (base + "/rendered", "dicomweb.rendered"),
             (f"/dicom-web/studies/{study}/thumbnail", "dicomweb.thumbnail"),
             (f"/dicom-web/studies/{study}/series/{series}", "dicomweb.retrieve")]
    for path, _ in calls:
        assert w.get(path).status_code == 200, path
    assert wado_uri(w, loaded.ct[2]).status_code == 200
    assert w.get(f"/dicom-web/studies/{study}/series/1.2.3").status_code == 404
    assert w.get(base, "application/dicom").status_code == 406
    events = access_events(w)[before:]
    assert [e.action for e in events] == [a for _, a in calls] + [
        "wado.retrieve", "dicomweb.retrieve", "dicomweb.retrieve"]
    for event in events:
        assert event.study_instance_uid == study and event.actor == "admin"
        assert "SYNTHETIC" not in event.detail and "WADO-1" not in event.detail
    assert all(e.patient_id == "WADO-1" for e in events[:-2])
    assert events[-2].outcome == "not_found" and events[-1].outcome == "failure"
    assert events[0].object_id == sop and "1 instance(s) sent" in events[0].detail


def test_hostile_paths_never_reach_the_file_system(loaded: Loaded) -> None:
    w = loaded.w
    for path in ("/dicom-web/studies/..%2F..%2Fetc%2Fpasswd/metadata",
                 "/dicom-web/studies/../../etc/passwd",
                 "/dicom-web/studies/1/series/2/instances/3/bulkdata/..%2F..%2Fx",
                 "/dicom-web/studies/%3Cscript%3E/series"):
        r = w.get(path)  # the client may normalise ../ away: then it is not ours at all
        assert r.status_code in (400, 404) and "root:" not in r.text, path


@pytest.mark.postgres
def test_retrieval_on_postgresql(tmp_path: Path, pg_url: str, dcmtk: None) -> None:
    files = [bundled(n) for n in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm",
                                  "MR_small_bigendian.dcm", "rtdose.dcm")]
    with started(tmp_path, pg_url) as w:
        send(w.server.router.dicom.port, files)
        w.server.router.runner.catch_up()
        for path in files:
            check_file(w, path)
        study, series, _ = ids(pydicom.dcmread(files[0], stop_before_pixels=True))
        assert len(w.client.retrieve_series(study, series)) == 1
        assert len(w.get(f"/dicom-web/studies/{study}/metadata").json()) == 1
