"""The S3 blob store against moto over HTTP: checksummed PUTs under content-addressed keys,
verified reads into the cache, refusal of a corrupted object, no second PUT of cached content,
eviction by size,
removal, crash recovery and an unreachable endpoint."""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from router.secrets import SecretBox
from router.settings import load_settings
from router.storage import s3_blobs
from router.storage.blobs import (
    STORAGE_SECRET_CONTEXT,
    BlobCorruptError,
    BlobError,
    open_blob_store,
)
from router.storage.s3_blobs import S3BlobStore, S3StoreConfig
from tests.integration.peers import free_port, s3_server


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"blobs-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def make_store(root: Path, endpoint: str, bucket: str, **options: Any) -> S3BlobStore:
    config = S3StoreConfig(bucket=bucket, endpoint_url=endpoint, access_key_id="test",
                           secret_access_key="test", **options)
    return S3BlobStore(root, config)


def received(store: S3BlobStore, data: bytes) -> tuple[Path, str]:
    """A spooled object, staged as the receive path stages it."""
    sha = hashlib.sha256(data).hexdigest()
    path = store.spool_dir / f"{uuid.uuid4().hex}.part"
    path.write_bytes(data)
    staged = store.stage(path, sha)
    assert staged is not None
    return staged, sha


def keys(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(entry["Key"] for entry in listing.get("Contents", []))


def recorded_puts(store: S3BlobStore) -> list[dict[str, str]]:
    """The headers of every PutObject the store's client sends from now on."""
    puts: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        puts.append({k.lower(): v.decode() if isinstance(v, bytes) else str(v)
                     for k, v in request.headers.items()})

    store.client.meta.events.register("before-send.s3.PutObject", record)
    return puts


def test_persist_puts_under_the_content_address_with_its_sha256_as_checksum(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket, prefix="site-a")
    puts = recorded_puts(store)
    data = os.urandom(5000)
    staged, sha = received(store, data)

    store.persist(sha, staged)
    store.persist(sha, staged)  # a retried save: not sent again

    key = f"site-a/{sha[:2]}/{sha[2:4]}/{sha}"
    assert keys(s3_endpoint, bucket) == [key]
    assert s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert len(puts) == 1
    # The server verifies the bytes against this (moto does not; S3 and MinIO do).
    assert puts[0]["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(sha)).decode()
    assert store.commit(sha, staged).read_bytes() == data  # the cache holds the new object
    assert list(store.spool_dir.iterdir()) == []


def test_content_already_cached_is_neither_staged_nor_put_again(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket)
    staged, sha = received(store, b"same content")
    store.persist(sha, staged)
    store.commit(sha, staged)
    puts = recorded_puts(store)
    resent = store.spool_dir / "resent.part"
    resent.write_bytes(b"same content")
    assert store.stage(resent, sha) is None  # a resend: the receipt refers to the stored one
    store.persist(sha, None)
    assert puts == [] and not resent.exists()
    assert store.commit(sha, None).read_bytes() == b"same content"


def test_content_only_in_the_bucket_is_put_again_unchanged(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    first = make_store(tmp_path / "a", s3_endpoint, bucket)
    staged, sha = received(first, b"same content")
    first.persist(sha, staged)
    second = make_store(tmp_path / "b", s3_endpoint, bucket)  # another router, empty cache
    again, _ = received(second, b"same content")
    second.persist(sha, again)
    assert keys(s3_endpoint, bucket) == [second.key_for(sha)]
    assert second.commit(sha, again).read_bytes() == b"same content"
    assert second.fetch(sha) == second.path_for(sha)


def test_a_read_downloads_into_the_cache_after_checking_the_sha256(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket)
    staged, sha = received(store, b"stored bytes")
    store.persist(sha, staged)
    store.commit(sha, staged).unlink()  # the cache lost it

    path = store.fetch(sha)
    assert path == store.path_for(sha)
    assert path.read_bytes() == b"stored bytes"
    assert store.wait_for(sha, timeout=1.0) == path
    assert list((store.blob_dir / "tmp").iterdir()) == []
    assert store.fetch(hashlib.sha256(b"never stored").hexdigest()) is None
    assert store.exists(sha)
    assert not store.exists(hashlib.sha256(b"never stored").hexdigest())


def test_a_corrupted_object_in_the_bucket_is_refused_on_read(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket)
    staged, sha = received(store, b"original bytes")
    store.persist(sha, staged)
    store.commit(sha, staged).unlink()
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key=store.key_for(sha), Body=b"bit rot")

    with pytest.raises(BlobCorruptError, match="does not match its SHA-256"):
        store.fetch(sha)
    with pytest.raises(BlobCorruptError):
        store.wait_for(sha, timeout=0.1)
    assert not store.path_for(sha).exists()
    assert list((store.blob_dir / "tmp").iterdir()) == []


def test_the_cache_evicts_the_least_recently_used_files_beyond_its_size(
        tmp_path: Path, s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_blobs, "EVICTION_GRACE", 0.0)
    store = make_store(tmp_path, s3_endpoint, bucket, cache_size=3500)
    shas = []
    for n in range(5):
        staged, sha = received(store, bytes([n]) * 1000)
        store.persist(sha, staged)
        store.commit(sha, staged)
        shas.append(sha)
    now = time.time()
    for age, sha in zip((500, 400, 300, 200, 100), shas, strict=True):
        os.utime(store.path_for(sha), (now - age, now - age))
    assert store.fetch(shas[0]) is not None  # read now: the most recently used

    store._evict()

    cached = [sha for sha in shas if store.path_for(sha).exists()]
    # 5000 bytes cached, limit 3500: the two least recently used go (down to 90 %).
    assert cached == [shas[0], shas[3], shas[4]]
    for sha in shas[1:3]:  # still in the bucket: read again on demand
        path = store.fetch(sha)
        assert path is not None and path.read_bytes() == bytes([shas.index(sha)]) * 1000


def test_recently_used_files_are_not_evicted(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket, cache_size=1000)
    staged, sha = received(store, b"x" * 4000)
    store.persist(sha, staged)
    store.commit(sha, staged)
    store._evict()  # over the limit, but just used: a reader may be about to open it
    assert store.path_for(sha).exists()


def test_remove_deletes_from_the_bucket_and_the_cache(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket)
    staged, sha = received(store, b"to be purged")
    store.persist(sha, staged)
    store.commit(sha, staged)
    assert store.remove(sha) == len(b"to be purged")
    assert keys(s3_endpoint, bucket) == []
    assert not store.path_for(sha).exists()
    assert store.remove(sha) is None


def test_recovery_puts_what_a_receipt_names_and_removes_the_rest(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    store = make_store(tmp_path, s3_endpoint, bucket)
    _, kept_sha = received(store, b"acknowledged")  # saved, then the process died
    orphan, orphan_sha = received(store, b"never acknowledged")
    (store.blob_dir / "tmp" / "abc.part").write_bytes(b"half a download")

    restarted = make_store(tmp_path, s3_endpoint, bucket)
    assert restarted.recover(lambda sha: sha == kept_sha) == (1, 1)

    assert keys(s3_endpoint, bucket) == [restarted.key_for(kept_sha)]
    assert restarted.path_for(kept_sha).read_bytes() == b"acknowledged"
    assert not orphan.exists() and not restarted.exists(orphan_sha)
    assert list(restarted.spool_dir.iterdir()) == []
    assert list((restarted.blob_dir / "tmp").iterdir()) == []


def test_an_unreachable_endpoint_fails_fast_with_a_blob_error(tmp_path: Path) -> None:
    store = make_store(tmp_path, f"http://127.0.0.1:{free_port()}", "nowhere")
    staged, sha = received(store, b"cannot be stored")
    started = time.monotonic()
    with pytest.raises(BlobError, match="bucket nowhere failed"):
        store.persist(sha, staged)
    assert time.monotonic() - started < 20
    with pytest.raises(BlobError, match="HeadBucket"):
        store.check()
    assert staged.exists()  # the caller discards it


def test_open_blob_store_opens_a_sealed_secret_and_checks_the_bucket(
        tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.seal("test", context=STORAGE_SECRET_CONTEXT)
    settings = load_settings({
        "DICOM_ROUTER_STORAGE_BACKEND": "s3", "DICOM_ROUTER_STORAGE_BUCKET": bucket,
        "DICOM_ROUTER_STORAGE_ENDPOINT_URL": s3_endpoint,
        "DICOM_ROUTER_STORAGE_ACCESS_KEY_ID": "test",
        "DICOM_ROUTER_STORAGE_SECRET_ACCESS_KEY": sealed,
        "DICOM_ROUTER_STORAGE_CACHE_SIZE": "2GB"}, data_dir=tmp_path)
    store = open_blob_store(settings, box, check=True)
    assert isinstance(store, S3BlobStore)
    assert store.config.secret_access_key == "test"
    assert store.config.cache_size == 2 * 1000**3
    assert "test" not in repr(store.config) and sealed not in repr(store.config)
    missing = replace(settings, storage=replace(settings.storage, bucket="no-such-bucket"))
    with pytest.raises(ValueError, match=r"the bucket cannot be used.*no-such-bucket"):
        open_blob_store(missing, box, check=True)
