"""An AI processor's callback, once its signature is verified: the result objects are received
like any instance (re-identified first when the study was de-identified, routed with the
result tags), the result is recorded, and the study's jobs are routed on by the tags.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eventsourcing.persistence import IntegrityError
from pydicom.filereader import read_file_meta_info

from router.ai.deid import reidentify
from router.ai.requests import AIRequests
from router.ai.reroute import reroute, routing_tags
from router.application.admin_state import AdminState
from router.application.conflicts import save_changed
from router.application.receive import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SUCCESS,
    Arrival,
    Receiver,
)
from router.dicom.header import HeaderError
from router.dicom.limits import check_file
from router.domain.ai import AIRequest
from router.storage.blobs import BlobStore

logger = logging.getLogger(__name__)

MAX_TAGS = 100
MAX_TEXT = 1000
SAVE_TRIES = 5
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CallbackError(Exception):
    """The callback cannot be applied; ``status`` is the HTTP answer (no PHI in the text)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ResultFile:
    """A DICOM part of the callback, spooled to disk."""

    path: Path
    sha256: str
    size: int


def check_result(document: object) -> tuple[str, dict[str, Any], str]:
    """``(status, tags, detail)`` from the callback JSON; CallbackError(400) when malformed."""
    if not isinstance(document, dict):
        raise CallbackError(400, "the callback body must be a JSON object")
    status = document.get("status")
    if status not in ("completed", "failed"):
        raise CallbackError(400, "status must be 'completed' or 'failed'")
    tags = document.get("tags", {})
    if not isinstance(tags, dict) or len(tags) > MAX_TAGS:
        raise CallbackError(400, f"tags must be an object with at most {MAX_TAGS} keys")
    for key, value in tags.items():
        if not _KEY.match(key):
            raise CallbackError(400, "tag names are 1-64 characters of A-Z a-z 0-9 _ -")
        if not _scalar_or_list(value):
            raise CallbackError(400, f"tag {key}: expected a string, number, boolean or a "
                                     "list of them")
    detail = document.get("message", "")
    return status, tags, str(detail)[:MAX_TEXT] if isinstance(detail, str) else ""


def _scalar_or_list(value: object) -> bool:
    def scalar(v: object) -> bool:
        return isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= MAX_TEXT)
    if isinstance(value, list):
        return len(value) <= MAX_TAGS and all(scalar(v) for v in value)
    return scalar(value)


class AICallbacks:
    """Applies verified callbacks (thread-safe as far as the event store is)."""

    def __init__(self, requests: AIRequests, ingest: Any, admin: AdminState, blobs: BlobStore,
                 receiver: Receiver) -> None:
        self.requests = requests
        self._ingest = ingest
        self._admin = admin
        self._blobs = blobs
        self._receiver = receiver

    def secret(self, aggregate: AIRequest) -> str | None:
        """The shared secret of the request's destination (None if it is gone)."""
        try:
            return self.requests.config(aggregate.destination).secret
        except Exception:
            return None

    def apply(self, aggregate: AIRequest, signature: str, document: object,
              files: list[ResultFile], source_ip: str) -> dict[str, Any]:
        """Receive the result objects, record the result, route the study on."""
        status, tags, detail = check_result(document)
        # A late result after a dead-letter is still taken; a second result is a replay.
        if signature in aggregate.signatures or aggregate.status in ("completed", "failed"):
            raise CallbackError(409, "this request already has its result")
        actor = f"ai:{aggregate.destination}"
        ctx = {"actor": actor, "source_ip": source_ip, "correlation_id": str(aggregate.id)}
        extra = routing_tags(aggregate.destination, tags)
        job_ids, refused = self._receive(aggregate, files, ctx, extra)
        self._record(aggregate, ctx, {"status": status, "tags": tags, "result_job_ids": job_ids,
                                      "signature": signature, "detail": detail})
        rerouted = 0
        if status == "completed" and tags:
            rerouted = reroute(self._ingest, self._admin, self._blobs, aggregate.job_ids,
                               extra, ctx)
        return {"status": status, "result_objects": len(job_ids), "refused_objects": refused,
                "rerouted_jobs": rerouted}

    def _record(self, aggregate: AIRequest, ctx: dict[str, Any], result: dict[str, Any]) -> None:
        """Save ``ResultReceived``. The worker may save ``Accepted`` between our load and this
        save (a processor can call back before its answer to the POST is recorded): then the
        result goes onto the request as stored now. Only another result in between is a
        conflict."""
        reads = iter([aggregate])

        def read() -> AIRequest | None:
            return next(reads, None) or self.requests.load(str(aggregate.id))

        def change(current: AIRequest | None) -> AIRequest:
            if current is None or result["signature"] in current.signatures \
                    or current.status in ("completed", "failed"):
                raise CallbackError(409, "this request got its result from a concurrent "
                                         "callback; this result is not recorded")
            current.receive_result(**ctx, **result)
            return current

        try:
            save_changed(read, change, self.requests.save, tries=SAVE_TRIES)
        except IntegrityError:
            raise CallbackError(503, "the request kept changing while the result was "
                                     "recorded; send the callback again") from None

    def _receive(self, aggregate: AIRequest, files: list[ResultFile], ctx: dict[str, str],
                 extra: dict[str, object]) -> tuple[list[str], int]:
        mapping = self.requests.mapping(aggregate) if files else None
        job_ids: list[str] = []
        refused = 0
        for item in files:
            try:
                arrival, refusal = self._arrival(item, mapping, ctx, extra)
            except Exception as exc:  # not DICOM Part 10: refused, the others still count
                logger.warning("AI result object refused: %s", type(exc).__name__)
                item.path.unlink(missing_ok=True)
                refused += 1
                continue
            if refusal is not None:  # beyond the dataset limits: recorded like any refusal
                item.path.unlink(missing_ok=True)
                self._receiver.refuse(arrival, STATUS_CANNOT_UNDERSTAND, refusal)
                refused += 1
                continue
            receipt = self._receiver.receive(arrival)
            if receipt.status == STATUS_SUCCESS and receipt.job_id:
                job_ids.append(receipt.job_id)
            else:
                refused += 1
        return job_ids, refused

    def _arrival(self, item: ResultFile, mapping: dict[str, str] | None, ctx: dict[str, str],
                 extra: dict[str, object]) -> tuple[Arrival, str | None]:
        """The arrival, and why it is refused before the Receiver sees it (None: it is not)."""
        sha256, size = item.sha256, item.size
        if mapping:
            try:  # pydicom reads it to put the names back: only within the dataset limits
                with item.path.open("rb") as fp:
                    check_file(fp, self._receiver.limits)
            except HeaderError as exc:
                return self._arrival_of(item, sha256, size, ctx, extra), str(exc)
            if reidentify(item.path, mapping):
                sha256, size = _digest(item.path)
        return self._arrival_of(item, sha256, size, ctx, extra), None

    def _arrival_of(self, item: ResultFile, sha256: str, size: int, ctx: dict[str, str],
                    extra: dict[str, object]) -> Arrival:
        meta = read_file_meta_info(item.path)
        return Arrival(
            path=item.path, sha256=sha256, size=size, source="ai", actor=ctx["actor"],
            source_ip=ctx["source_ip"], calling_aet="", called_aet="",
            sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
            sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
            correlation_id=ctx["correlation_id"], extra=extra)


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
