"""The blob store in an S3 bucket: ``<prefix>ab/cd/<sha256>``, with a local read cache.

A received object is PUT with its SHA-256 as the checksum the server verifies before its
receipt is saved (:meth:`S3BlobStore.persist`), so an acknowledged object is in the bucket.
Reads go through ``<data_dir>/blob-cache`` (same layout as ``blobs/``): a miss downloads the
object, checks its SHA-256 against its key and only then renames it into place. The cache is
kept under ``cache_size`` by removing the least recently used files, never one used in the
last ``EVICTION_GRACE`` seconds (a reader opens its path right after getting it, and an open
file stays readable after its unlink).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from router.storage.blobs import BlobCorruptError, BlobError, BlobStore, check_sha256
from router.storage.s3_client import s3_client
from router.storage.s3_names import object_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

logger = logging.getLogger(__name__)

CACHE_FOLDER = "blob-cache"
EVICTION_GRACE = 120.0  # seconds: a file used this recently is never evicted
LOW_WATER = 0.9  # eviction stops at this share of cache_size
MAX_SINGLE_PUT = 5 * 1024**3  # S3's limit for one PutObject
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})

# Evictions walk the cache: one at a time per process, off the receive path.
_EVICTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-cache-evict")


@dataclass(frozen=True)
class S3StoreConfig:
    """Where the bucket is and how to sign in (the secret already opened)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = ""
    cache_size: int = 10 * 1000**3

    def __repr__(self) -> str:  # never the secret
        return f"S3StoreConfig(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"


class S3BlobStore(BlobStore):
    """Received objects in a bucket; ``blob_dir`` is the local cache. Thread-safe.

    The boto3 client is made in the process that uses it, on first use: receivers are
    separate processes and each makes its own.
    """

    remote = True

    def __init__(self, root: Path, config: S3StoreConfig) -> None:
        super().__init__(root, blob_folder=CACHE_FOLDER)
        self.config = config
        self._prefix = object_prefix(config.prefix)
        self._client_lock = threading.Lock()
        self._s3: S3Client | None = None
        self._boto_errors: tuple[type[Exception], ...] = ()
        self._tmp_dir = self.blob_dir / "tmp"
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        # Staged files already PUT (a retried save does not PUT again).
        self._uploaded: set[Path] = set()
        self._lock = threading.Lock()
        self._added = 0  # bytes put in the cache since the last eviction check
        self._evicting = False
        self._check_every = max(config.cache_size // 20, 1 << 20)

    # --- the bucket -------------------------------------------------------------------
    def key_for(self, sha256: str) -> str:
        """The object's key: only the validated prefix and a checked digest."""
        sha = check_sha256(sha256)
        return f"{self._prefix}{sha[:2]}/{sha[2:4]}/{sha}"

    def describe(self) -> str:
        return f"s3://{self.config.bucket}/{self._prefix} (cache {self.blob_dir})"

    @property
    def client(self) -> S3Client:
        with self._client_lock:
            if self._s3 is None:
                self._s3 = self._make_client()
            return self._s3

    def _make_client(self) -> S3Client:
        from botocore.exceptions import BotoCoreError, ClientError

        self._boto_errors = (ClientError, BotoCoreError)
        config = self.config
        # A C-STORE waits for the PUT: an unreachable store must fail in seconds.
        return s3_client(endpoint_url=config.endpoint_url, region=config.region,
                         access_key_id=config.access_key_id,
                         secret_access_key=config.secret_access_key, connect_timeout=5,
                         max_pool_connections=32)

    def _failure(self, what: str, exc: Exception) -> BlobError:
        """A BlobError naming the bucket and the S3 error code: never a key or a secret."""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "unknown")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            # HEAD answers have no body: only the status says what went wrong.
            code = {"404": "not found", "403": "access denied"}.get(str(code), code)
            reason = f"{code} (HTTP {status})"
        else:
            reason = type(exc).__name__
        return BlobError(f"S3 blob store {what} on bucket {self.config.bucket} failed: {reason}")

    def _is_missing(self, exc: Exception) -> bool:
        response = getattr(exc, "response", None)
        return isinstance(response, dict) and str(
            response.get("Error", {}).get("Code")) in _NOT_FOUND

    def check(self) -> None:
        """HeadBucket: the endpoint answers and these credentials may use the bucket."""
        client = self.client
        try:
            client.head_bucket(Bucket=self.config.bucket)
        except self._boto_errors as exc:
            raise self._failure("HeadBucket", exc) from None
        self._evict()

    def stored_size(self, sha256: str) -> int | None:
        """The object's size in the bucket (HeadObject), None when there is none."""
        client = self.client
        try:
            head = client.head_object(Bucket=self.config.bucket, Key=self.key_for(sha256))
        except self._boto_errors as exc:
            if self._is_missing(exc):
                return None
            raise self._failure("HeadObject", exc) from None
        return int(head["ContentLength"])

    # --- writing ----------------------------------------------------------------------
    def stage(self, temp_path: Path, sha256: str) -> Path | None:
        # Only the cache is asked (no round trip): a cached blob was PUT before it was cached.
        cached = self.path_for(sha256)
        if _touch(cached):
            temp_path.unlink(missing_ok=True)
            return None
        staged = self.spool_dir / f"{check_sha256(sha256)}.{uuid.uuid4().hex}.ready"
        os.replace(temp_path, staged)
        return staged

    def persist(self, sha256: str, staged: Path | None) -> None:
        """PUT the staged file; BlobError if the bucket did not take it.

        No HeadObject first: content this router holds in its cache is not staged at all
        (:meth:`stage`), which covers the usual duplicate, a resend; for other content a HEAD
        would cost a round trip per new object (7.5 ms against 24 ms for a 525 kB PUT, moto on
        loopback), and PUTting the same bytes under the same key again changes nothing.
        """
        if staged is None:
            return
        with self._lock:
            if staged in self._uploaded:
                return
        try:
            self._put(sha256, staged, staged.stat().st_size)
        except BlobError:
            raise
        except OSError as exc:  # the staged file itself: still not in the bucket
            raise BlobError(f"S3 blob store: the staged object could not be read: "
                            f"{exc.strerror or type(exc).__name__}") from None
        with self._lock:
            self._uploaded.add(staged)

    def _put(self, sha256: str, staged: Path, size: int) -> None:
        if size > MAX_SINGLE_PUT:
            raise BlobError(f"S3 blob store: objects above {MAX_SINGLE_PUT} bytes are not "
                            "supported (one PutObject)")
        client = self.client
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
        try:
            with staged.open("rb") as body:
                # The server hashes what it received and refuses other bytes.
                client.put_object(Bucket=self.config.bucket, Key=self.key_for(sha256),
                                  Body=body, ContentLength=size, ChecksumSHA256=checksum,
                                  ContentType="application/dicom")
        except self._boto_errors as exc:
            raise self._failure("PutObject", exc) from None

    def commit(self, sha256: str, staged: Path | None) -> Path:
        """After the receipt is saved: the staged file becomes the cached copy."""
        self._forget(staged)
        target = self.path_for(sha256)
        if staged is None or not staged.exists():
            return target  # already in the bucket (and maybe cached)
        size = staged.stat().st_size
        super().commit(sha256, staged)
        self._cached(size)
        return target

    def discard(self, staged: Path | None) -> None:
        # An object already PUT stays in the bucket: a concurrent receipt of the same content
        # may have PUT it too and be saving its receipt now (README, "Blob store").
        self._forget(staged)
        super().discard(staged)

    def _forget(self, staged: Path | None) -> None:
        if staged is not None:
            with self._lock:
                self._uploaded.discard(staged)

    def recover(self, is_referenced: Callable[[str], bool]) -> tuple[int, int]:
        """As the local store's (staged objects a receipt names are PUT, then cached), and
        downloads a crash interrupted are removed. Runs before any reader."""
        for leftover in self._tmp_dir.glob("*.part"):
            leftover.unlink(missing_ok=True)
        return super().recover(is_referenced)

    # --- reading ----------------------------------------------------------------------
    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file() or self.stored_size(sha256) is not None

    def fetch(self, sha256: str) -> Path | None:
        """The cached file, downloaded and verified on a miss; None if the bucket has none.

        Raises :class:`BlobCorruptError` when the object does not hash to its key and
        :class:`BlobError` when the bucket cannot be read.
        """
        path = self.path_for(sha256)
        if _touch(path):
            return path
        client = self.client
        self._tmp_dir.mkdir(parents=True, exist_ok=True)  # the cache may have been wiped
        tmp = self._tmp_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        try:
            answer = client.get_object(Bucket=self.config.bucket, Key=self.key_for(sha256))
            with tmp.open("xb") as out:
                for chunk in answer["Body"].iter_chunks(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # a cached file is trusted: never a torn one
        except self._boto_errors as exc:
            tmp.unlink(missing_ok=True)
            if self._is_missing(exc):
                return None
            raise self._failure("GetObject", exc) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            logger.error("S3 blob store: the object %s in bucket %s does not match its "
                         "SHA-256; not served", sha256, self.config.bucket)
            raise BlobCorruptError(f"S3 blob store: object {sha256} in bucket "
                                   f"{self.config.bucket} does not match its SHA-256")
        size = tmp.stat().st_size
        self._ensure_folder(sha256, path)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # its folder was removed with the cache: make it again
            with self._folders_lock:
                self._folders.discard(sha256[:4])
            self._ensure_folder(sha256, path)
            os.replace(tmp, path)
        self._cached(size)
        return path

    def wait_for(self, sha256: str, timeout: float) -> Path | None:
        """As the local store's (a receipt being committed is waited for), else fetched."""
        path = super().wait_for(sha256, timeout)
        if path is not None:
            _touch(path)
            return path
        return self.fetch(sha256)

    def remove(self, sha256: str) -> int | None:
        """Delete from the bucket and the cache; the bytes freed, None if neither had it."""
        size = self.stored_size(sha256)
        if size is not None:
            try:
                self.client.delete_object(Bucket=self.config.bucket, Key=self.key_for(sha256))
            except self._boto_errors as exc:
                raise self._failure("DeleteObject", exc) from None
        cached = super().remove(sha256)
        return size if size is not None else cached

    # --- the cache ----------------------------------------------------------------------
    def _cached(self, size: int) -> None:
        with self._lock:
            self._added += size
            if self._added < self._check_every or self._evicting:
                return
            self._added = 0
            self._evicting = True
        _EVICTOR.submit(self._evict)

    def _evict(self) -> None:
        """Remove the least recently used cached files until under the low-water mark."""
        try:
            files = list(_cache_files(self.blob_dir))
            total = sum(size for _, size, _ in files)
            limit = self.config.cache_size
            if total <= limit:
                return
            target = int(limit * LOW_WATER)
            recent = time.time() - EVICTION_GRACE
            removed = 0
            for used, size, path in sorted(files):
                if total <= target or used > recent:
                    break
                path.unlink(missing_ok=True)
                total -= size
                removed += 1
            logger.info("blob cache: %d files evicted, %d bytes kept", removed, total)
        except OSError as exc:
            logger.error("blob cache eviction failed: %s", exc.strerror or type(exc).__name__)
        finally:
            with self._lock:
                self._evicting = False


def _touch(path: Path) -> bool:
    """Mark a cached file as just used (its mtime orders the eviction); False if absent."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _cache_files(blob_dir: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every cached blob (``ab/cd/<sha256>``)."""
    found: list[tuple[float, int, Path]] = []
    for first in os.scandir(blob_dir):
        if not first.is_dir(follow_symlinks=False) or len(first.name) != 2:
            continue
        for second in os.scandir(first.path):
            if not second.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(second.path):
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, stat.st_size, Path(entry.path)))
    return found
