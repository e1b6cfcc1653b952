"""STOW-RS: ``POST /dicom-web/studies[/{study}]`` with a multipart/related body of
``application/dicom`` parts (PS3.18 10.5).

The body is streamed part by part into spool files (never held in memory beyond a bounded
first stretch), each part counted and its Content-Type checked before its file exists: a body
of too many parts, or of other media types, is refused without writing a file. Only when the
whole body is well-formed and every part is a DICOM Part 10 file is anything stored, so a 400
means nothing was. Each instance then takes the C-STORE path (Receiver: durable blob, receipt and
routing events in one save, routed by rules) with the user as actor and source ``stow``.
The answer waits (at most 2 s) until the studies view holds what was stored, so a QIDO-RS or
WADO-RS made after it finds every instance; if the view still lags, it carries a Warning.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydicom.filereader import read_file_meta_info

from router.application.commands import Actor
from router.application.receive import (
    STATUS_DATASET_MISMATCH,
    STATUS_SUCCESS,
    Arrival,
    Receipt,
    Receiver,
)
from router.application.sessions import AccessRecord
from router.dicom.header_scan import scan_header
from router.dicom.limits import DatasetLimits
from router.dicom.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES
from web.api.common import ApiError
from web.auth import actor_of, record_access
from web.dicomweb.lookup import base_path, url_path
from web.dicomweb.multipart_in import (
    BodyTooLargeError,
    MultipartError,
    Part,
    SpoolWriteError,
    discard,
    parse_media_type,
    read_parts,
)
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

logger = logging.getLogger(__name__)

# The web app's client_max_size (64 MiB) only bounds bodies read into memory; STOW streams
# its body to the spool instead, so it has its own, larger limit per request.
MAX_REQUEST_BYTES = 4 * 1024**3
MAX_PARTS = 10_000
DICOM_JSON = "application/dicom+json"

# Failure Reason (0008,1197) values, PS3.18 Table I.2-2 (the Receiver's DIMSE statuses
# 0xA700, 0xA900, 0xC000 and 0xC001 are passed through as they are).
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STORAGE_UIDS = frozenset(STORAGE_CLASSES)
_SYNTAX_UIDS = frozenset(str(uid) for uid in TRANSFER_SYNTAXES)


def is_uid(value: Any) -> bool:
    """Digits and dots, at most 64 characters: safe in a URL, a log line or an event."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


@dataclass(frozen=True)
class Candidate:
    """A part that is a DICOM Part 10 file, with the identity its file meta declares."""

    part: Part
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Outcome:
    """What happened to one instance; ``status`` 0 when stored."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    study_uid: str = ""
    series_uid: str = ""
    patient_id: str = ""
    reason: str = ""  # why it was refused (the Receiver's words, no PHI)


def check_part_headers(number: int, headers: Mapping[str, str]) -> None:
    """Before a part is spooled: it is application/dicom (or says nothing), else a 400."""
    media, _ = parse_media_type(headers.get("content-type") or "application/dicom")
    if media != "application/dicom":
        raise MultipartError(f"part {number} is {media}, not application/dicom")


def inspect_part(part: Part, number: int) -> Candidate:
    """The part's declared identity; MultipartError (a 400) if it is not DICOM Part 10."""
    check_part_headers(number, part.headers)
    try:
        meta = read_file_meta_info(part.path)
        uids = (str(meta.get("MediaStorageSOPClassUID", "")),
                str(meta.get("MediaStorageSOPInstanceUID", "")),
                str(meta.get("TransferSyntaxUID", "")))
    except Exception:  # pydicom raises many types for bytes that are not DICOM
        raise MultipartError(f"part {number} is not a DICOM Part 10 file") from None
    if not all(is_uid(uid) for uid in uids):
        raise MultipartError(f"part {number} has no valid SOP Class, SOP Instance or "
                             "Transfer Syntax UID in its file meta information")
    return Candidate(part, *uids)


def store_one(receiver: Receiver, candidate: Candidate, study: str | None,
              actor: Actor) -> Outcome:
    """Check one instance like the DICOM listener would, then hand it to the Receiver."""
    part = candidate.part
    arrival = Arrival(
        path=part.path, sha256=part.sha256, size=part.size, source="stow", actor=actor.name,
        source_ip=actor.source_ip, calling_aet="", called_aet="",
        sop_class_uid=candidate.sop_class_uid, sop_instance_uid=candidate.sop_instance_uid,
        transfer_syntax_uid=candidate.transfer_syntax_uid,
        correlation_id=actor.correlation_id)
    found = _identity(candidate, receiver.limits)
    sop_class = found.get("SOPClassUID", "")
    sop_class = sop_class if is_uid(sop_class) else candidate.sop_class_uid
    # An unreadable header is the Receiver's to refuse (0xC000), whatever the URL says.
    refusal = _refusal(candidate, sop_class, found.get("StudyInstanceUID", ""),
                       study if found else None)
    if refusal is not None:
        part.path.unlink(missing_ok=True)
        receipt: Receipt = receiver.refuse(arrival, *refusal)
    else:
        receipt = receiver.receive(arrival)
    return Outcome(sop_class, candidate.sop_instance_uid, receipt.status,
                   found.get("StudyInstanceUID", ""), found.get("SeriesInstanceUID", ""),
                   found.get("PatientID", ""), receipt.reason)


def _identity(candidate: Candidate, limits: DatasetLimits) -> dict[str, str]:
    """SOP class, study, series and patient from the header; empty when it is unreadable
    (never read in a transfer syntax we refuse: deflate would be inflated without bound), or
    beyond the dataset limits (walked first, as the Receiver does, before pydicom reads)."""
    if candidate.transfer_syntax_uid not in _SYNTAX_UIDS:
        return {}
    try:
        header = scan_header(candidate.part.path, limits=limits).dataset
        return {key: str(header.get(key) or "") for key in
                ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")}
    except Exception:  # HeaderError, or a value pydicom cannot convert: the Receiver says
        return {}


def _refusal(candidate: Candidate, sop_class: str, study_uid: str,
             study: str | None) -> tuple[int, str] | None:
    """What the DICOM listener refuses at association time, plus the URL's study."""
    if candidate.transfer_syntax_uid not in _SYNTAX_UIDS:
        return TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not accepted"
    if sop_class not in _STORAGE_UIDS:
        return SOP_CLASS_NOT_SUPPORTED, "not a storage SOP class"
    if study is not None and study_uid != study:
        return STATUS_DATASET_MISMATCH, "Study Instance UID differs from the request URL"
    return None


def store_all(receiver: Receiver, candidates: list[Candidate], study: str | None,
              actor: Actor) -> list[Outcome]:
    outcomes: list[Outcome] = []
    try:
        for candidate in candidates:
            outcomes.append(store_one(receiver, candidate, study, actor))
    finally:
        discard([c.part for c in candidates[len(outcomes):]])  # after an unexpected error
    return outcomes


def http_status(outcomes: list[Outcome]) -> int:
    stored = sum(1 for o in outcomes if o.status == STATUS_SUCCESS)
    if stored == len(outcomes):
        return 200
    return 202 if stored else 409


def response_dataset(outcomes: list[Outcome], base: str, study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON; ``base`` is the
    DICOMweb root path."""
    def reference(o: Outcome) -> dict[str, Any]:
        return {"00081150": {"vr": "UI", "Value": [o.sop_class_uid]},
                "00081155": {"vr": "UI", "Value": [o.sop_instance_uid]}}

    stored = [o for o in outcomes if o.status == STATUS_SUCCESS]
    failed = [o for o in outcomes if o.status != STATUS_SUCCESS]
    studies = {o.study_uid for o in stored} or ({study} if study else set())
    dataset: dict[str, Any] = {"00081190": {"vr": "UR"}}
    if len(studies) == 1 and all(is_uid(s) for s in studies):
        dataset["00081190"]["Value"] = [url_path(base, studies.pop())]
    if failed:
        dataset["00081198"] = {"vr": "SQ", "Value": [
            {**reference(o), "00081197": {"vr": "US", "Value": [o.status]}} for o in failed]}
    if stored:
        dataset["00081199"] = {"vr": "SQ", "Value": [
            {**reference(o), "00081190": {"vr": "UR", "Value": [_instance_url(base, o)]}}
            for o in stored]}
    return dataset


def _instance_url(base: str, o: Outcome) -> str:
    if not (is_uid(o.study_uid) and is_uid(o.series_uid)):
        return ""
    return url_path(base, o.study_uid, o.series_uid, o.sop_instance_uid)


def dicom_json(data: Any, status: int) -> web.Response:
    """DICOM JSON with the exact media type (no charset: dicomweb-client insists)."""
    return web.Response(body=orjson.dumps(data), status=status,
                        headers={"Content-Type": DICOM_JSON})


def request_boundary(request: web.Request) -> str:
    """The multipart boundary; 415 for another media type, 400 when it is malformed."""
    try:
        media, params = parse_media_type(request.headers.get("Content-Type", ""))
    except MultipartError:
        raise ApiError(415, "Content-Type must be multipart/related; "
                            'type="application/dicom"') from None
    root = params.get("type", "application/dicom").lower()
    if media != "multipart/related" or root != "application/dicom":
        raise ApiError(415, "only multipart/related; type=\"application/dicom\" is "
                            "supported (not DICOM JSON or XML with bulk data)")
    if "boundary" not in params:
        raise ApiError(400, "multipart/related without a boundary parameter")
    return params["boundary"]


def check_accept(request: web.Request) -> None:
    """406 unless the client accepts DICOM JSON (the only response we give)."""
    accept = request.headers.get("Accept", "").strip()
    if not accept:
        return
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in ("*/*", "application/*", DICOM_JSON, "application/json"):
            return
    raise ApiError(406, "the response is only available as application/dicom+json")


async def read_request(request: web.Request, study: str | None) -> list[Candidate]:
    """Stream the body into spool files and check every part is DICOM (else nothing stays)."""
    boundary = request_boundary(request)
    check_accept(request)
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        raise ApiError(413, f"a STOW-RS request may carry at most {MAX_REQUEST_BYTES} bytes")
    router = request.app[ROUTER_KEY]
    try:
        parts = await read_parts(request.content, boundary, router.blobs.spool_dir,
                                 max_bytes=MAX_REQUEST_BYTES, max_parts=MAX_PARTS,
                                 check=check_part_headers)
    except BodyTooLargeError as exc:
        raise ApiError(413, str(exc)) from None
    except MultipartError as exc:
        raise ApiError(400, f"bad multipart body: {exc}") from None
    except SpoolWriteError as exc:
        logger.error("STOW-RS spool write failed: %s", exc.strerror or type(exc).__name__)
        raise ApiError(503, "out of resources: the upload could not be written to disk") \
            from None
    try:
        return await asyncio.to_thread(lambda: [inspect_part(part, number) for number, part
                                                in enumerate(parts, 1)])
    except MultipartError as exc:
        await asyncio.to_thread(discard, parts)
        raise ApiError(400, str(exc)) from None
    except BaseException:
        await asyncio.to_thread(discard, parts)
        raise


async def store_instances(request: web.Request) -> web.StreamResponse:
    """Store the instances of a multipart/related body (PS3.18 10.5)."""
    study = request.match_info.get("study")
    if study is not None and not is_uid(study):
        await _record_refused(request, None, "400: study UID in the URL is not a UID")
        raise ApiError(400, "the study in the URL is not a valid UID")
    try:
        candidates = await read_request(request, study)
    except ApiError as exc:
        await _record_refused(request, study, f"{exc.status}: {exc.message}")
        raise
    router = request.app[ROUTER_KEY]
    outcomes = await asyncio.to_thread(store_all, router.receiver, candidates, study,
                                       actor_of(request))
    if any(o.status == STATUS_SUCCESS for o in outcomes):
        await fresh(request, "studies")  # answer once the stored instances can be found
    for record in access_records(outcomes, study):
        await record_access(request, record)
    # Retrieve URLs are paths on this server, like QIDO's (right behind a reverse proxy too).
    return dicom_json(response_dataset(outcomes, base_path(request), study),
                      http_status(outcomes))


def access_records(outcomes: Iterable[Outcome], study: str | None) -> list[AccessRecord]:
    """One access record per study the request touched (usually one)."""
    by_study: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_study.setdefault(o.study_uid or study or "", []).append(o)
    records = []
    for uid, group in by_study.items():
        stored = sum(1 for o in group if o.status == STATUS_SUCCESS)
        failed = {f"0x{o.status:04X}" for o in group if o.status != STATUS_SUCCESS}
        records.append(AccessRecord(
            action="study.store", object_type="study", object_id=uid,
            outcome="success" if stored else "failure",
            study_instance_uid=uid or None,
            patient_id=next((o.patient_id for o in group if o.patient_id), None),
            detail=f"STOW-RS: stored {stored}, failed {len(group) - stored}"
                   + (f" ({', '.join(sorted(failed))})" if failed else "")))
    return records


async def _record_refused(request: web.Request, study: str | None, detail: str) -> None:
    await record_access(request, AccessRecord(
        action="study.store", object_type="study", object_id=study or "",
        outcome="failure", study_instance_uid=study, detail=f"STOW-RS: {detail}"[:500]))


ROUTES = [
    Route("POST", "/dicom-web/studies", store_instances, "studies.store",
          summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")",
          tags=("dicomweb",)),
    Route("POST", "/dicom-web/studies/{study}", store_instances, "studies.store",
          summary="STOW-RS: store instances of one study (others are refused, 409)",
          tags=("dicomweb",)),
]
