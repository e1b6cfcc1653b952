"""The blob store's staging: concurrent receipts of one content, failures, crash recovery."""

from __future__ import annotations

import hashlib
from pathlib import Path

from router.storage.blobs import BlobStore


def spooled(store: BlobStore, name: str, data: bytes) -> tuple[Path, str]:
    path = store.spool_dir / f"{name}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_a_failed_receipt_never_discards_the_bytes_of_a_concurrent_one(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first, sha = spooled(store, "a", b"same content")
    second, _ = spooled(store, "b", b"same content")
    staged_first = store.stage(first, sha)
    staged_second = store.stage(second, sha)  # before the first is committed
    store.discard(staged_first)  # the first receipt's save failed
    assert store.commit(sha, staged_second).read_bytes() == b"same content"
    assert list(store.spool_dir.iterdir()) == []


def test_content_already_stored_is_not_staged_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path, sha = spooled(store, "a", b"x")
    store.commit(sha, store.stage(path, sha))
    again, _ = spooled(store, "b", b"x")
    assert store.stage(again, sha) is None
    assert not again.exists()
    assert store.commit(sha, None) == store.path_for(sha)


def test_recovery_keeps_what_a_receipt_names_and_removes_the_rest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    kept, kept_sha = spooled(store, "kept", b"acknowledged")
    store.stage(kept, kept_sha)
    orphan, orphan_sha = spooled(store, "orphan", b"never acknowledged")
    store.stage(orphan, orphan_sha)
    _, lost_sha = spooled(store, "lost", b"saved, rename lost")  # still .part
    store.spool_dir.joinpath("junk.part").write_bytes(b"half written")

    committed, removed = store.recover(lambda sha: sha in {kept_sha, lost_sha})

    assert (committed, removed) == (2, 2)
    assert store.path_for(kept_sha).read_bytes() == b"acknowledged"
    assert store.path_for(lost_sha).read_bytes() == b"saved, rename lost"
    assert not store.exists(orphan_sha)
    assert list(store.spool_dir.iterdir()) == []


def test_a_prepared_folder_is_made_ahead_and_a_vanished_one_made_again(tmp_path: Path) -> None:
    import shutil

    store = BlobStore(tmp_path)
    path, sha = spooled(store, "a", b"prepared")
    store.prepare(sha)
    store.prepare(sha)  # twice: one background job
    assert store.commit(sha, store.stage(path, sha)).read_bytes() == b"prepared"
    # The store remembers the folder exists; removed behind its back, it is made again.
    shutil.rmtree(store.blob_dir / sha[:2])
    again, _ = spooled(store, "b", b"prepared")
    assert store.commit(sha, store.stage(again, sha)).read_bytes() == b"prepared"
