"""The file, s3 and dicom adapters against real peers: a folder, moto over HTTP, DCMTK storescp.

Also a pynetdicom SCP on a real socket for the C-STORE statuses storescp cannot produce.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config

from router.dicom.store_scu import StoreLink
from router.dispatch.base import (
    Outgoing,
    PermanentDeliveryError,
    RefusedAddressError,
    TransientDeliveryError,
)
from router.dispatch.dicom import DicomAdapter, DicomDestinationConfig
from router.dispatch.file import FileAdapter, FileDestinationConfig
from router.dispatch.s3 import MIB, S3Adapter, S3DestinationConfig
from router.dispatch.ssrf import AddressPolicy
from tests.conftest import open_policy
from tests.integration.peers import StoreScp, free_port, s3_server

pytestmark = pytest.mark.timeout(120)

POLICY = open_policy()  # every peer of these tests is on loopback

HOSTILE_UIDS = {
    "PatientID": "../../../../tmp/evil",
    "StudyInstanceUID": "/etc/passwd",
    "SeriesInstanceUID": "..",
    "SOPInstanceUID": "..\\..\\x\x00y",
}


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def outgoing(path: Path, header: Dataset | None = None, sha256: str | None = None) -> Outgoing:
    """An Outgoing for a Part 10 file, as the dispatcher would build it."""
    data = path.read_bytes()
    header = header if header is not None else dcmread(path, stop_before_pixels=True)
    return Outgoing(
        delivery_id=str(uuid.uuid4()),
        path=path,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        sop_class_uid=str(header.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")),
        sop_instance_uid=str(header.get("SOPInstanceUID", "1.2.3")),
        transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
        load_header=lambda: header,
    )


def hostile(path: Path) -> Outgoing:
    """A real file whose header carries path-traversal attempts instead of UIDs."""
    header = dcmread(path, stop_before_pixels=True)
    saved = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE  # they are invalid
    try:
        for keyword, value in HOSTILE_UIDS.items():
            setattr(header, keyword, value)
    finally:
        pydicom_config.settings.reading_validation_mode = saved
    return outgoing(path, header)


def tree(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# -- file --------------------------------------------------------------------------------------


def file_adapter(folder: Path, **options: Any) -> FileAdapter:
    return FileAdapter(FileDestinationConfig(name="archive", path=str(folder), **options),
                       policy=POLICY.folders)


def test_file_adapter_writes_atomically_at_the_templated_path(tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    source = bundled("CT_small.dcm")
    item = outgoing(source)
    assert file_adapter(folder).send(item) == f"written ({item.size} bytes)"
    header = item.header
    target = (
        folder
        / header.PatientID
        / header.StudyInstanceUID
        / header.SeriesInstanceUID
        / f"{header.SOPInstanceUID}.dcm"
    )
    assert tree(folder) == [target]  # no temp files left behind
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_file_adapter_keeps_hostile_header_values_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nested" / "archive"
    folder.mkdir(parents=True)
    file_adapter(folder).send(hostile(bundled("CT_small.dcm")))
    written = tree(tmp_path)
    assert len(written) == 1 and written[0].is_relative_to(folder)
    assert (
        written[0].relative_to(folder).as_posix()
        == "_._.._.._.._tmp_evil/_etc_passwd/_./_._.._x_y.dcm"
    )


def test_file_adapter_identical_content_succeeds_and_changed_content_replaces(
    tmp_path: Path,
) -> None:
    adapter = file_adapter(tmp_path, template="{SOPInstanceUID}.dcm")
    first = outgoing(bundled("CT_small.dcm"))
    adapter.send(first)
    assert adapter.send(first).startswith("already present with identical content")
    changed_blob = tmp_path / "changed.blob"
    changed_blob.write_bytes(first.path.read_bytes() + b"\0\0")
    assert adapter.send(outgoing(changed_blob, first.header)).startswith("written")
    target = tmp_path / f"{first.sop_instance_uid}.dcm"
    assert target.read_bytes() == changed_blob.read_bytes()


def test_file_adapter_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    folder, outside = tmp_path / "archive", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    item = outgoing(bundled("CT_small.dcm"))
    (folder / item.header.PatientID).symlink_to(outside)
    with pytest.raises(PermanentDeliveryError, match="outside folder"):
        file_adapter(folder).send(item)
    assert tree(outside) == []


def test_file_adapter_missing_folder_is_transient(tmp_path: Path) -> None:
    adapter = file_adapter(tmp_path / "not-mounted")
    with pytest.raises(TransientDeliveryError, match="does not exist"):
        adapter.send(outgoing(bundled("CT_small.dcm")))
    with pytest.raises(TransientDeliveryError, match="does not exist"):
        adapter.check()
    assert not (tmp_path / "not-mounted").exists()  # never created: it may be a mount point


def test_file_adapter_disk_full_is_transient_and_names_no_header_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(os, "replace", full)
    item = outgoing(bundled("CT_small.dcm"))
    with pytest.raises(TransientDeliveryError) as caught:
        file_adapter(tmp_path).send(item)
    message = str(caught.value)
    assert "ENOSPC" in message and str(tmp_path) in message
    assert item.header.PatientID not in message and item.sop_instance_uid not in message
    assert [p for p in tree(tmp_path) if p.name.endswith(".part")] == []


def test_file_adapter_corrupt_blob_is_permanent(tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    item = outgoing(bundled("CT_small.dcm"), sha256="0" * 64)
    with pytest.raises(PermanentDeliveryError, match="SHA-256"):
        file_adapter(folder).send(item)
    assert tree(folder) == []


def test_file_check_probes_the_folder(tmp_path: Path) -> None:
    assert "folder writable" in file_adapter(tmp_path).check()
    assert list(tmp_path.iterdir()) == []


# -- s3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"dest-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def s3_adapter(endpoint: str, bucket: str, **options: Any) -> S3Adapter:
    values: dict[str, Any] = {
        "name": "cloud",
        "bucket": bucket,
        "endpoint_url": endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        **options,
    }
    return S3Adapter(S3DestinationConfig(**values), policy=POLICY.addresses)


def objects(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return [entry["Key"] for entry in listing.get("Contents", [])]


def test_s3_single_put_carries_checksum_and_sha256_metadata(s3_endpoint: str, bucket: str) -> None:
    item = outgoing(bundled("CT_small.dcm"))
    adapter = s3_adapter(s3_endpoint, bucket, prefix="site-a/")
    assert adapter.send(item) == f"uploaded {item.size} bytes to bucket {bucket} in 1 part(s)"
    adapter.close()
    header = item.header
    key = f"site-a/{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{header.SOPInstanceUID}.dcm"
    assert objects(s3_endpoint, bucket) == [key]
    stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert stored["Body"].read() == item.path.read_bytes()
    assert stored["Metadata"] == {"sha256": item.sha256}
    assert stored["ContentType"] == "application/dicom"


def test_s3_multipart_above_the_threshold(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    blob = tmp_path / "big.blob"
    blob.write_bytes(bundled("CT_small.dcm").read_bytes() + os.urandom(11 * MIB))
    item = outgoing(blob, dcmread(bundled("CT_small.dcm"), stop_before_pixels=True))
    adapter = s3_adapter(s3_endpoint, bucket, multipart_threshold=5 * MIB, template="x.dcm")
    assert adapter.send(item).endswith("in 3 part(s)")
    stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="x.dcm")
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == item.sha256
    assert stored["Metadata"]["sha256"] == item.sha256
    uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


def test_s3_corrupt_blob_is_permanent_and_leaves_nothing(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    blob = tmp_path / "big.blob"
    blob.write_bytes(os.urandom(6 * MIB))
    header = dcmread(bundled("CT_small.dcm"), stop_before_pixels=True)
    adapter = s3_adapter(s3_endpoint, bucket, multipart_threshold=5 * MIB)
    with pytest.raises(PermanentDeliveryError, match="SHA-256"):
        adapter.send(outgoing(blob, header, sha256="0" * 64))
    with pytest.raises(PermanentDeliveryError, match="SHA-256"):
        adapter.send(outgoing(bundled("CT_small.dcm"), sha256="0" * 64))
    assert objects(s3_endpoint, bucket) == []
    assert s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_keys_from_hostile_header_values_stay_under_the_prefix(
    s3_endpoint: str, bucket: str
) -> None:
    s3_adapter(s3_endpoint, bucket, prefix="p/").send(hostile(bundled("CT_small.dcm")))
    assert objects(s3_endpoint, bucket) == ["p/_etc_passwd/_./_._.._x_y.dcm"]


def test_s3_missing_bucket_is_permanent(s3_endpoint: str) -> None:
    adapter = s3_adapter(s3_endpoint, "no-such-bucket-here")
    with pytest.raises(PermanentDeliveryError, match="NoSuchBucket") as caught:
        adapter.send(outgoing(bundled("CT_small.dcm")))
    assert "1.3.6.1.4.1" not in str(caught.value)  # no key (UIDs) in the message
    with pytest.raises(PermanentDeliveryError, match="HeadBucket"):
        adapter.check()


def test_s3_bad_credentials_are_permanent() -> None:
    with s3_server(enforce_auth=True) as endpoint:
        adapter = s3_adapter(endpoint, "imaging", access_key_id="AKIANOTKNOWN")
        with pytest.raises(PermanentDeliveryError, match="InvalidAccessKeyId"):
            adapter.send(outgoing(bundled("CT_small.dcm")))
        with pytest.raises(PermanentDeliveryError, match="HTTP 403"):
            adapter.check()


def test_s3_server_down_is_transient() -> None:
    adapter = s3_adapter(f"http://127.0.0.1:{free_port()}", "any-bucket")
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError, match="unreachable"):
        adapter.send(outgoing(bundled("CT_small.dcm")))
    with pytest.raises(TransientDeliveryError, match="EndpointConnectionError"):
        adapter.check()
    assert time.monotonic() - started < 30


def test_s3_connects_only_to_addresses_the_policy_checked(
        s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's connections are made by the address policy: the endpoint's name is resolved
    by us at each connection, so a name that turns to loopback (rebinding) is refused."""
    answers = {"rebinding-store": "127.0.0.1"}  # one label: moto reads a.b.c as bucket a
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    endpoint = s3_endpoint.replace("127.0.0.1", "rebinding-store")
    assert s3_adapter(endpoint, bucket).send(outgoing(bundled("CT_small.dcm"))).startswith(
        "uploaded")
    strict = S3Adapter(S3DestinationConfig(name="cloud", bucket=bucket, endpoint_url=endpoint,
                                           access_key_id="test", secret_access_key="test"),
                       policy=AddressPolicy())
    with pytest.raises(RefusedAddressError, match="loopback"):
        strict.send(outgoing(bundled("CT_small.dcm")))
    with pytest.raises(RefusedAddressError, match="loopback"):
        strict.check()
    strict.close()


def test_s3_check_heads_the_bucket(s3_endpoint: str, bucket: str) -> None:
    assert s3_adapter(s3_endpoint, bucket).check() == f"bucket {bucket} reachable"


@pytest.mark.parametrize(
    ("code", "status", "permanent"),
    [
        ("AccessDenied", 403, True),
        ("NoSuchBucket", 404, True),
        ("InvalidAccessKeyId", 403, True),
        ("SignatureDoesNotMatch", 403, True),
        ("BadDigest", 400, True),
        ("SomethingNew", 400, True),
        ("SlowDown", 503, False),
        ("RequestTimeout", 400, False),
        ("InternalError", 500, False),
        ("ServiceUnavailable", 503, False),
        ("TooManyRequests", 429, False),
        ("SomethingOdd", 502, False),
    ],
)
def test_s3_error_classification(code: str, status: int, permanent: bool) -> None:
    from botocore.exceptions import ClientError

    error = ClientError(
        {
            "Error": {"Code": code, "Message": "about key 1.2.3"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )
    adapter = s3_adapter("http://127.0.0.1:9", "bucket")
    classified = adapter._error(error)
    assert isinstance(classified, PermanentDeliveryError if permanent else TransientDeliveryError)
    assert str(classified) == f"S3 PutObject on bucket bucket failed: {code} (HTTP {status})"


# -- dicom -------------------------------------------------------------------------------------

UNCOMPRESSED = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_implicit.dcm", "rtdose.dcm"]
COMPRESSED = ["JPEG2000.dcm", "MR_small_RLE.dcm", "JPEG-LL.dcm"]


def dicom_adapter(port: int, **options: Any) -> DicomAdapter:
    values: dict[str, Any] = {
        "name": "pacs",
        "host": "127.0.0.1",
        "port": port,
        "ae_title": "STORESCP",
        "timeout": 10.0,
        **options,
    }
    return DicomAdapter(DicomDestinationConfig(**values), calling_ae="DICOMROUTER",
                        policy=POLICY.addresses)


def received_by_uid(scp: StoreScp) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, scp.received())}


def pixel_hash(ds: Dataset) -> str | None:
    return hashlib.sha256(ds.PixelData).hexdigest() if "PixelData" in ds else None


@pytest.fixture
def count_associate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the associations our C-STORE SCU requests."""
    calls: list[int] = []
    original = StoreLink.open.__func__  # type: ignore[attr-defined]

    def counting(cls: type[StoreLink], *args: Any, **kwargs: Any) -> StoreLink:
        calls.append(1)
        return original(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(StoreLink, "open", classmethod(counting))
    return calls


@pytest.mark.dcmtk
def test_dicom_sends_several_files_over_one_association(
    tmp_path: Path, count_associate: list[int]
) -> None:
    items = [outgoing(bundled(name)) for name in UNCOMPRESSED]
    with StoreScp(tmp_path) as scp:
        adapter = dicom_adapter(scp.port)
        details = [adapter.send(item) for item in items]
        adapter.close()
        assert count_associate == [1] and adapter.associations_opened == 1
        assert scp.associations() == 1
    # rtplan.dcm and rtdose.dcm name another instance in their file meta: the command names
    # the data set's own, so they are streamed as stored like the others.
    assert details == ["stored"] * 5
    received = received_by_uid(scp)
    for item in items:
        original = dcmread(item.path)
        assert pixel_hash(received[item.sop_instance_uid]) == pixel_hash(original)


@pytest.mark.dcmtk
def test_dicom_sets_tcp_nodelay_on_its_association(tmp_path: Path) -> None:
    with StoreScp(tmp_path) as scp:
        adapter = dicom_adapter(scp.port)
        adapter.send(outgoing(bundled("CT_small.dcm")))
        assert adapter._assoc is not None
        sock = adapter._assoc.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        adapter.close()


@pytest.mark.dcmtk
def test_dicom_streams_compressed_files_as_stored_when_the_peer_accepts_them(
    tmp_path: Path,
) -> None:
    items = [outgoing(bundled(name)) for name in COMPRESSED]
    with StoreScp(tmp_path, extra_args=("+xa",)) as scp:
        adapter = dicom_adapter(scp.port)
        assert [adapter.send(item) for item in items] == ["stored"] * len(items)
        adapter.close()
    received = received_by_uid(scp)
    for item in items:
        ds = received[item.sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID == item.transfer_syntax_uid
        assert pixel_hash(ds) == pixel_hash(dcmread(item.path))


@pytest.mark.dcmtk
def test_dicom_decompresses_for_a_peer_that_only_accepts_uncompressed(tmp_path: Path) -> None:
    items = [outgoing(bundled(name)) for name in COMPRESSED]
    with StoreScp(tmp_path) as scp:  # storescp's default: uncompressed syntaxes only
        adapter = dicom_adapter(scp.port)
        details = [adapter.send(item) for item in items]
        adapter.close()
    assert details[0] == f"stored (decompressed from {JPEG2000.name})"
    assert details[1] == f"stored (decompressed from {RLELossless.name})"
    received = received_by_uid(scp)
    for item in items:
        ds = received[item.sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.pixel_array == dcmread(item.path).pixel_array).all()


@pytest.mark.dcmtk
def test_dicom_reassociates_once_for_a_new_transfer_syntax(tmp_path: Path) -> None:
    ct, j2k = outgoing(bundled("CT_small.dcm")), outgoing(bundled("JPEG2000.dcm"))
    with StoreScp(tmp_path, extra_args=("+xa",)) as scp:
        adapter = dicom_adapter(scp.port)
        for item in (ct, j2k, ct, j2k, ct):
            adapter.send(item)
        adapter.close()
        assert adapter.associations_opened == 2 and scp.associations() == 2


@pytest.mark.dcmtk
def test_dicom_releases_an_idle_association_and_opens_a_new_one_later(tmp_path: Path) -> None:
    item = outgoing(bundled("CT_small.dcm"))
    with StoreScp(tmp_path) as scp:
        adapter = dicom_adapter(scp.port, idle_close=0.2)
        adapter.send(item)
        adapter.send(item)
        deadline = time.monotonic() + 5
        while adapter._assoc is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert adapter._assoc is None
        assert scp.wait_log("Association Release")
        adapter.send(item)
        adapter.close()
        assert scp.wait_log("Association Release", count=2)
        assert scp.associations() == 2


@pytest.mark.dcmtk
def test_dicom_check_is_a_c_echo(tmp_path: Path) -> None:
    with StoreScp(tmp_path) as scp:
        assert dicom_adapter(scp.port).check().startswith("C-ECHO ok in ")
        assert scp.wait_log("Received Echo Request")


def test_dicom_peer_down_is_transient() -> None:
    adapter = dicom_adapter(free_port())
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        adapter.send(outgoing(bundled("CT_small.dcm")))
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        adapter.check()


def test_dicom_unknown_host_is_transient() -> None:
    adapter = dicom_adapter(104, host="no-such-host.invalid")
    with pytest.raises(TransientDeliveryError, match="cannot resolve"):
        adapter.send(outgoing(bundled("CT_small.dcm")))


@pytest.mark.dcmtk
def test_dicom_permanent_rejection_is_permanent(tmp_path: Path) -> None:
    with StoreScp(tmp_path, extra_args=("--refuse",)) as scp:
        adapter = dicom_adapter(scp.port)
        with pytest.raises(PermanentDeliveryError, match="permanently rejected"):
            adapter.send(outgoing(bundled("CT_small.dcm")))


@pytest.mark.dcmtk
def test_dicom_abort_during_a_store_is_transient_and_the_next_send_reconnects(
    tmp_path: Path,
) -> None:
    item = outgoing(bundled("CT_small.dcm"))
    with StoreScp(tmp_path, extra_args=("--abort-after",)) as scp:
        adapter = dicom_adapter(scp.port)
        with pytest.raises(TransientDeliveryError, match="ended before a C-STORE response"):
            adapter.send(item)
        with pytest.raises(TransientDeliveryError):
            adapter.send(item)
        assert scp.associations() == 2


@pytest.mark.dcmtk
def test_dicom_unanswered_store_times_out_as_transient(tmp_path: Path) -> None:
    with StoreScp(tmp_path, extra_args=("--sleep-during", "3")) as scp:
        adapter = dicom_adapter(scp.port, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError, match="no answer within 1 s"):
            adapter.send(outgoing(bundled("CT_small.dcm")))
        assert time.monotonic() - started < 2.5


@contextlib.contextmanager
def status_peer(
    statuses: list[int], syntaxes: list[str] | None = None, received: list[Dataset] | None = None
) -> Iterator[int]:
    """A pynetdicom SCP answering C-STOREs with ``statuses`` in turn (then 0x0000).

    ``syntaxes`` limits the transfer syntaxes it accepts; ``received`` collects the data sets.
    """
    ae = AE(ae_title="STORESCP")
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes or context.transfer_syntax)

    def answer(event: evt.Event) -> int:
        if received is not None:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            received.append(dataset)
        return statuses.pop(0) if statuses else 0x0000

    # A router built earlier in this process switched pynetdicom (a global) to streaming
    # received data sets into our spool format; this peer wants plain pynetdicom data sets.
    chunked = pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, answer)]
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = chunked


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # a UID in rtdose_expb.dcm
def test_dicom_converts_big_endian_for_a_little_endian_only_peer() -> None:
    names = ["MR_small_bigendian.dcm", "rtdose_expb.dcm", "ExplVR_BigEnd.dcm"]
    items = [outgoing(bundled(name)) for name in names]
    received: list[Dataset] = []
    little = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    with status_peer([], syntaxes=little, received=received) as port:
        adapter = dicom_adapter(port)
        details = [adapter.send(item) for item in items]
        adapter.close()
    assert details == [f"stored (converted from {ExplicitVRBigEndian.name})"] * 3
    for item, dataset in zip(items, received, strict=True):
        original = dcmread(item.path)
        assert dataset.SOPInstanceUID == original.SOPInstanceUID
        assert dataset.Rows == original.Rows and dataset.BitsAllocated == original.BitsAllocated
        assert (dataset.pixel_array == original.pixel_array).all()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0xB000, "warning 0xB000"),
        (0xB007, "warning 0xB007"),
        (0xA700, TransientDeliveryError("out of resources \\(status 0xA700\\)")),
        (0xA7FF, TransientDeliveryError("0xA7FF")),
        (0xA900, PermanentDeliveryError("0xA900 \\(data set does not match SOP class\\)")),
        (0xC123, PermanentDeliveryError("0xC123 \\(cannot understand\\)")),
        (0x0122, PermanentDeliveryError("SOP class not supported")),
    ],
)
def test_dicom_store_statuses(status: int, outcome: str | Exception) -> None:
    item = outgoing(bundled("CT_small.dcm"))
    with status_peer([status]) as port:
        adapter = dicom_adapter(port)
        if isinstance(outcome, str):
            assert adapter.send(item) == outcome
        else:
            with pytest.raises(type(outcome), match=str(outcome)):
                adapter.send(item)
        assert adapter.send(item) == "stored"  # the association survives a failure status
        assert adapter.associations_opened == 1
        adapter.close()


def test_dicom_undecodable_pixel_data_for_an_uncompressed_only_peer_is_permanent(
    tmp_path: Path,
) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = dcmread(bundled("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really a video stream"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    little = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    with status_peer([], syntaxes=little) as port:
        adapter = dicom_adapter(port)
        with pytest.raises(PermanentDeliveryError) as caught:
            adapter.send(outgoing(path))
        adapter.close()
    message = str(caught.value)
    assert "CT Image Storage" in message and MPEG2MPML.name in message
    assert "cannot be decompressed" in message
    assert str(ds.PatientName) not in message and ds.PatientID not in message


def test_dicom_idle_close_zero_releases_after_every_instance() -> None:
    item = outgoing(bundled("CT_small.dcm"))
    with status_peer([]) as port:
        adapter = dicom_adapter(port, idle_close=0)
        adapter.send(item)
        assert adapter._assoc is None
        adapter.send(item)
        assert adapter.associations_opened == 2


def test_dicom_proposes_at_most_128_contexts_and_always_the_newest() -> None:
    adapter = dicom_adapter(104)
    item = outgoing(bundled("JPEG2000.dcm"))
    for number in range(80):
        adapter._want(replace(item, sop_class_uid=f"1.2.3.{number}"))
    adapter._want(item)
    contexts, requested = adapter._contexts()
    assert len(contexts) <= 128 and len(requested) == len(contexts)
    assert (item.sop_class_uid, item.transfer_syntax_uid) in requested
    assert (item.sop_class_uid, ExplicitVRLittleEndian) in requested
    assert ("1.2.3.79", ImplicitVRLittleEndian) in requested
    assert ("1.2.3.0", ExplicitVRLittleEndian) not in requested  # least recently used


@pytest.mark.dcmtk
def test_dicom_large_objects_are_streamed_in_full_size_fragments(tmp_path: Path) -> None:
    """3 MB data sets to a peer taking 128 KB PDUs: the fragments go by sendfile."""
    from tests.synthetic import make_ct_series

    paths = make_ct_series(tmp_path / "big", count=2, rows=1224, cols=1224)
    items = [outgoing(path) for path in paths]
    with StoreScp(tmp_path / "scp", extra_args=("--max-pdu", "131072")) as scp:
        adapter = dicom_adapter(scp.port)
        assert [adapter.send(item) for item in items] == ["stored", "stored"]
        adapter.close()
    received = received_by_uid(scp)
    for item in items:
        assert pixel_hash(received[item.sop_instance_uid]) == pixel_hash(dcmread(item.path))


@pytest.mark.parametrize("peer_reads", [True, False], ids=["reads-all", "stops-reading"])
def test_dicom_gives_up_on_a_peer_that_accepts_but_never_answers(
        tmp_path: Path, peer_reads: bool) -> None:
    """The association's timeout holds while sending (a 12 MB object to a peer that stops
    reading blocks sendfile) and while waiting for the response (a peer that reads all and
    answers nothing): one timeout and a transient error, not a hang."""
    import threading

    from router.dicom import pdus
    from tests.synthetic import make_ct_series

    path = make_ct_series(tmp_path / "big", count=1, rows=2448, cols=2448)[0]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ended = threading.Event()

    def silent_peer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            header = conn.recv(6, socket.MSG_WAITALL)
            length = int.from_bytes(header[2:6], "big")
            request = pdus.parse_associate_rq(conn.recv(length, socket.MSG_WAITALL))
            results = [(c.context_id, pdus.ACCEPTED, c.transfer_syntaxes[0])
                       for c in request.contexts]
            conn.sendall(pdus.encode_associate_ac(request, results, 0, "1.2.3", "SILENT"))
            if peer_reads:
                while conn.recv(1 << 16):  # reads everything, answers nothing
                    pass
            else:
                conn.recv(1 << 16)  # a first bite, then nothing until the sender gives up
                while conn.recv(1 << 16, socket.MSG_PEEK) and not ended.wait(0.2):
                    pass
            ended.set()

    thread = threading.Thread(target=silent_peer, daemon=True)
    thread.start()
    adapter = dicom_adapter(port, timeout=1.5)
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError, match=r"no answer within 1\.5 s"):
        adapter.send(outgoing(path))
    assert 1.0 < time.monotonic() - started < 10
    if peer_reads:
        assert ended.wait(5), "the association was closed after the timeout"
    ended.set()
    adapter.close()
    listener.close()
