"""A dry run of transforms: a stored instance's header before and after one transform, or a
destination's chain, element by element. Nothing is sent, stored or recorded in the
re-identification map; the caller records the access (the header is PHI).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from projections.jobs_queries import latest_job_of_instance
from router.application.admin_state import AdminSnapshot
from router.dispatch.transforming import chain_for
from router.storage.blobs import BlobError, BlobStore
from router.transforms.chain import TransformFailed, VersionedTransform, apply_chain

_VALUE_CHARS = 200


class PreviewError(ValueError):
    """The preview cannot be made; ``field`` names the input at fault ("" for none)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class PreviewNotFound(PreviewError):
    """No stored instance has this SOP Instance UID."""


@dataclass(frozen=True)
class Preview:
    """Rows of ``(path, name, VR, before, after, change)``; change is "", "changed",
    "added" or "removed"."""

    job_id: str
    study_instance_uid: str | None
    patient_id: str | None
    applied: list[dict[str, object]]
    rows: list[dict[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "applied": self.applied, "rows": self.rows,
                "changed": sum(1 for r in self.rows if r["change"])}


def choose_chain(snapshot: AdminSnapshot, transform: str, destination: str,
                 matched_rules: str) -> list[VersionedTransform]:
    """One named transform, or a destination's chain for this instance (rules' first)."""
    if bool(transform) == bool(destination):
        raise PreviewError("choose either a transform or a destination", "transform")
    if transform:
        found = snapshot.transforms.get(transform)
        if found is None:
            raise PreviewError(f"transform {transform!r} does not exist", "transform")
        return [found]
    if destination not in snapshot.live_destinations():
        raise PreviewError(f"destination {destination!r} does not exist", "destination")
    chain, missing = chain_for(snapshot, destination, matched_rules)
    if missing:
        raise PreviewError(f"destination {destination!r} names transform(s) that do not "
                           f"exist: {', '.join(missing)}", "destination")
    return chain


def preview(jobs_db: Any, blobs: BlobStore, snapshot: AdminSnapshot, seed_for: Any, *,
            sop_instance_uid: str, transform: str = "", destination: str = "") -> Preview:
    """The before/after rows for the latest stored instance with ``sop_instance_uid``."""
    uid = sop_instance_uid.strip()
    if not uid or len(uid) > 64:
        raise PreviewError("a SOP Instance UID of 1-64 characters is required",
                           "sop_instance_uid")
    job = latest_job_of_instance(jobs_db, uid)
    if job is None:
        raise PreviewNotFound("no stored instance has this SOP Instance UID",
                              "sop_instance_uid")
    chain = choose_chain(snapshot, transform.strip(), destination.strip(),
                         job["matched_rules"] or "")
    try:
        path = blobs.wait_for(job["sha256"], timeout=2.0)
    except BlobError as exc:
        raise PreviewError(f"the stored object cannot be read: {exc}") from None
    if path is None:
        raise PreviewError("the stored object is no longer in the blob store")
    try:
        dataset = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types on a damaged file
        raise PreviewError(f"the stored object is unreadable ({type(exc).__name__})") from None
    # "Before" from a copy: reading an element decodes it, and a charset repair must still
    # find the received bytes undecoded.
    before = dict(_flatten(copy.deepcopy(dataset)))
    try:
        result = apply_chain(dataset, chain, calling_aet=job["calling_aet"] or "",
                             seed_for=seed_for)
    except TransformFailed as exc:
        raise PreviewError(str(exc)) from None
    after = dict(_flatten(dataset))
    return Preview(job_id=job["job_id"], study_instance_uid=job["study_instance_uid"],
                   patient_id=job["patient_id"], applied=result.applied,
                   rows=_rows(before, after))


def _rows(before: dict[str, tuple[str, str, str]],
          after: dict[str, tuple[str, str, str]]) -> list[dict[str, str]]:
    rows = []
    for path in list(before) + [p for p in after if p not in before]:
        old, new = before.get(path), after.get(path)
        name, vr = (old or new or ("", "", ""))[:2]
        change = ("added" if old is None else "removed" if new is None
                  else "changed" if old[2] != new[2] else "")
        rows.append({"path": path, "name": name, "vr": vr, "before": old[2] if old else "",
                     "after": new[2] if new else "", "change": change})
    return rows


def _flatten(dataset: Dataset, prefix: str = "") -> Iterator[tuple[str, tuple[str, str, str]]]:
    """(path, (name, VR, shown value)) of every element, through sequence items."""
    for element in dataset:
        tag = f"({element.tag.group:04X},{element.tag.element:04X})"
        path = prefix + tag
        name = element.name if element.tag.is_private else (element.keyword or element.name)
        if element.VR == "SQ":
            items = element.value or ()
            yield path, (name, "SQ", f"{len(items)} item(s)")
            for i, item in enumerate(items):
                yield from _flatten(item, f"{path}[{i}].")
        else:
            yield path, (name, str(element.VR), _shown(element.value))


def _shown(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + "…"
