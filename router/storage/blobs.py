"""Content-addressed blob store on local disk: ``blobs/ab/cd/<sha256>``, plus the spool.

An object moves spool temp file -> ``spool/<sha>.ready`` (before the receipt is saved) ->
``blobs/...`` (after). A crash leaves ``.ready`` files that recovery keeps or deletes depending on
whether a receipt names them, so nothing acknowledged is lost and no orphan stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.secrets import SecretBox
    from router.settings import Settings

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# Makes blob folders ahead of the commit (see BlobStore.prepare); one thread is plenty.
_FOLDERS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-folders")


class BlobError(OSError):
    """The blob store could not take or find an object."""


class BlobCorruptError(BlobError):
    """A stored object does not hash to its key: it is not served."""


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(sha256: str) -> str:
    """Only a lowercase hex SHA-256 ever becomes part of a path."""
    if not _SHA256.match(sha256):
        raise BlobError(f"not a SHA-256 digest: {sha256[:80]!r}")
    return sha256


class BlobStore:
    """Local, content-addressed, fsynced storage of received objects.

    The one interface every reader and writer uses; router/storage/s3_blobs.py keeps the
    objects in a bucket behind it, with ``blob_dir`` as a cache.
    """

    remote = False  # True: fetch() may download (callers on an event loop use a thread)

    def __init__(self, root: Path, blob_folder: str = "blobs") -> None:
        self.root = root
        self.blob_dir = root / blob_folder
        self.spool_dir = root / "spool"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # Folders ("ab/cd") known to exist, and those being made in the background.
        self._folders: set[str] = set()
        self._making: dict[str, Future[None]] = {}
        self._folders_lock = threading.Lock()

    def path_for(self, sha256: str) -> Path:
        """Where the blob is (or would be) kept on this disk: no I/O, no download."""
        check_sha256(sha256)
        return self.blob_dir / sha256[:2] / sha256[2:4] / sha256

    def fetch(self, sha256: str) -> Path | None:
        """A local file with the blob's bytes, or None when it is not stored."""
        path = self.path_for(sha256)
        return path if path.is_file() else None

    def describe(self) -> str:
        """Where the blobs are, for people (the storage page)."""
        return str(self.blob_dir)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def wait_for(self, sha256: str, timeout: float) -> Path | None:
        """The blob's path once committed. A receipt's events can be visible a moment before
        its blob is moved into place, so a staged blob is waited for; None if neither exists.
        """
        path = self.path_for(sha256)
        deadline = time.monotonic() + timeout
        while not path.exists():
            ready = next(self._staged_files(sha256), None)
            if ready is None:
                return path if path.exists() else None
            if time.monotonic() > deadline:  # commit failed after the save: read it staged
                return ready
            time.sleep(0.005)
        return path

    def _staged_files(self, sha256: str) -> Iterator[Path]:
        return self.spool_dir.glob(f"{check_sha256(sha256)}.*.ready")

    def stage(self, temp_path: Path, sha256: str) -> Path | None:
        """Move a fsynced spool file aside under its digest; None if the blob already exists.

        Each receipt stages under its own name (``<sha>.<id>.ready``): two receipts of the same
        content at once never share, so one failing cannot discard the other's bytes. When the
        content is already stored, the temp file is deleted and nothing is staged.
        """
        if self.exists(sha256):
            temp_path.unlink(missing_ok=True)
            return None
        staged = self.spool_dir / f"{check_sha256(sha256)}.{uuid.uuid4().hex}.ready"
        os.replace(temp_path, staged)
        return staged

    def prepare(self, sha256: str) -> None:
        """Start making the folder ``sha256`` will be committed to, in the background.

        A new store has 65,536 folders to make, one per early object, and making one costs
        0.1-0.3 ms here: the receive path calls this first so that it overlaps the parsing.
        """
        key = check_sha256(sha256)[:4]
        with self._folders_lock:
            if key in self._folders or key in self._making:
                return
            self._making[key] = _FOLDERS.submit(self._make_folder, sha256)

    def _make_folder(self, sha256: str) -> None:
        self.path_for(sha256).parent.mkdir(parents=True, exist_ok=True)

    def _ensure_folder(self, sha256: str, target: Path) -> None:
        key = sha256[:4]
        with self._folders_lock:
            if key in self._folders:
                return
            making = self._making.pop(key, None)
        if making is not None:
            making.exception()  # wait; a failure shows in the mkdir below
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        with self._folders_lock:
            self._folders.add(key)

    def commit(self, sha256: str, staged: Path | None) -> Path:
        """After the receipt is saved: move the staged file into the store."""
        target = self.path_for(sha256)
        if staged is not None and staged.exists():
            self._ensure_folder(sha256, target)
            # No directory fsync here: the data was fsynced before the receipt was saved, and a
            # rename lost in a power cut leaves the file under its old name, which recovery
            # finds (by name for .ready files, by content hash for .part files). Identical
            # content committed twice simply replaces itself.
            try:
                os.replace(staged, target)
            except FileNotFoundError:
                if not staged.exists():
                    raise
                # The folder went away under us (removed by hand?): make it again, once.
                with self._folders_lock:
                    self._folders.discard(sha256[:4])
                self._ensure_folder(sha256, target)
                os.replace(staged, target)
        elif not target.exists():
            raise BlobError(f"blob {sha256} is neither staged nor stored")
        return target

    def persist(self, sha256: str, staged: Path | None) -> None:
        """Before the receipt is saved, after the spool's fsync: make the staged object
        durable in the store. Here the fsync was that; a remote store uploads it."""

    def discard(self, staged: Path | None) -> None:
        """The receipt was not saved: forget its staged file (a stored blob is left alone)."""
        if staged is not None:
            staged.unlink(missing_ok=True)

    def staged(self) -> Iterator[tuple[str, Path]]:
        for path in self.spool_dir.glob("*.ready"):
            sha256 = path.name.split(".", 1)[0]
            if _SHA256.match(sha256):
                yield sha256, path

    def recover(self, is_referenced: Callable[[str], bool]) -> tuple[int, int]:
        """After a crash: keep staged or spooled files a receipt names, delete the others.

        A ``.part`` file whose rename to ``.ready`` was lost is identified by hashing it.
        Returns (committed, removed).
        """
        committed = removed = 0
        for leftover in list(self.spool_dir.glob("*.part")):
            sha256 = _hash_file(leftover)
            if is_referenced(sha256) and not self.exists(sha256):
                self.persist(sha256, leftover)
                self.commit(sha256, leftover)
                committed += 1
            else:
                leftover.unlink(missing_ok=True)
                removed += 1
        for sha256, path in list(self.staged()):
            if is_referenced(sha256):
                self.persist(sha256, path)
                self.commit(sha256, path)
                committed += 1
            else:
                self.discard(path)
                removed += 1
        if committed or removed:
            logger.info("blob recovery: %d staged blobs kept, %d orphans removed",
                        committed, removed)
        return committed, removed

    def remove(self, sha256: str) -> int | None:
        """Delete the blob; the bytes freed, None if it was not stored (OSError on failure)."""
        path = self.path_for(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    def disk_free(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize


# What a sealed [storage] secret is bound to (its associated data).
STORAGE_SECRET_CONTEXT = "storage/secret_access_key"  # noqa: S105 - a name, not a secret


def open_blob_store(settings: Settings, box: SecretBox, *, check: bool = False) -> BlobStore:
    """The store ``[storage] backend`` names; ``check``: fail now if the bucket is unusable
    (the supervisor at start; receivers then trust it).

    A sealed ``secret_access_key`` (``enc:v1:...``) is opened here, and only here.
    """
    storage = settings.storage
    if storage.backend != "s3":
        return BlobStore(settings.data_dir)
    from router.storage.s3_blobs import S3BlobStore, S3StoreConfig

    secret = storage.secret_access_key or ""
    if box.is_sealed(secret):
        secret = box.open(secret, context=STORAGE_SECRET_CONTEXT)
    store = S3BlobStore(settings.data_dir, S3StoreConfig(
        bucket=storage.bucket, prefix=storage.prefix, endpoint_url=storage.endpoint_url,
        region=storage.region, access_key_id=storage.access_key_id, secret_access_key=secret,
        cache_size=storage.cache_size))
    if check:
        try:
            store.check()
        except BlobError as exc:
            from router.settings import SettingsError

            raise SettingsError(f"storage: the bucket cannot be used: {exc}") from None
    return store
