"""WADO-RS under ``/dicom-web``: studies, series and instances as streamed
``multipart/related; type="application/dicom"`` (a part per instance, copied from the blob store
in chunks, or re-encoded as Explicit VR Little Endian one instance at a time), their metadata
as ``application/dicom+json`` from the metadata cache (metadata_cache.py), and the pixel
resources of wado_pixels.py. Each call is one access record with the study and patient.

Transfer syntax comes from the Accept header: ``transfer-syntax=*`` sends instances as stored;
Explicit VR Little Endian is produced when asked (and, as PS3.18's default, when no transfer
syntax is named) if the stored pixel data can be decoded; otherwise 406, or as stored when the
client named no transfer syntax.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from pydicom.uid import UID

from web.api.common import ApiError
from web.dicomweb import accept
from web.dicomweb.access import AccessNote, audited
from web.dicomweb.dicom_json import MEDIA_TYPE, warning
from web.dicomweb.lookup import InstanceRow, base_path, blob_path, find_instances, url_path
from web.dicomweb.metadata_cache import MetadataCache, with_base
from web.dicomweb.multipart import ClientGone, MultipartWriter
from web.dicomweb.stored import DecodeError, decodable, explicit_le
from web.dicomweb.wado_pixels import (
    rendered_frames,
    rendered_instance,
    retrieve_bulkdata,
    retrieve_frames,
    thumbnail_of,
)
from web.keys import ROUTER_KEY
from web.routes import Route

METADATA_BATCH = 100  # entries read per thread hop while streaming metadata
Plan = list[tuple[InstanceRow, Path, str]]


def _plan(request: web.Request, rows: list[InstanceRow], choices: list[str]) -> Plan:
    """(row, stored file, transfer syntax to send) per instance still stored; 406 when one
    cannot be sent in any acceptable transfer syntax."""
    plan: Plan = []
    for row in rows:
        path = blob_path(request, row)
        if path is None:
            continue
        ts = accept.dicom_choice(choices, row.transfer_syntax, decodable(row.transfer_syntax))
        if ts is None:
            raise ApiError(406, f"an instance stored as {UID(row.transfer_syntax).name} cannot"
                                " be sent in a transfer syntax the Accept header allows; ask"
                                " for the stored one (transfer-syntax=*)")
        plan.append((row, path, ts))
    if not plan:
        raise ApiError(404, "the stored objects of these instances are no longer kept here")
    return plan


async def _encoded(path: Path, row: InstanceRow, ts: str, choices: list[str]
                   ) -> tuple[bytes | None, str]:
    """Re-encoded bytes (None: send the file as stored) and the transfer syntax they are in."""
    if ts == row.transfer_syntax:
        return None, ts
    try:
        return await asyncio.to_thread(explicit_le, path), ts
    except DecodeError:
        if accept.AS_STORED in choices or row.transfer_syntax in choices:
            return None, row.transfer_syntax
        raise


async def _retrieve(request: web.Request, note: AccessNote) -> web.StreamResponse:
    choices = accept.accepted(request.headers.get("Accept"), accept.dicom_choices)
    rows = await find_instances(request, note)
    plan = await asyncio.to_thread(_plan, request, rows, choices)
    writer = MultipartWriter(request, accept.DICOM)
    note.stream = writer.response
    if len(plan) < len(rows):
        writer.response.headers["Warning"] = warning(
            f"{len(rows) - len(plan)} instance(s) are no longer stored here")
    skipped, syntaxes = 0, set()
    for row, path, ts in plan:
        try:
            data, sent_ts = await _encoded(path, row, ts, choices)
        except DecodeError as exc:
            if len(plan) == 1:
                raise ApiError(406, f"{exc}; ask for transfer-syntax=*") from None
            skipped += 1  # others still go out; the access record says how many did not
            continue
        content_type = f"{accept.DICOM}; transfer-syntax={sent_ts}"
        if data is None:
            await writer.add_file(content_type, path)
        else:
            await writer.add_bytes(content_type, data)
        syntaxes.add(UID(sent_ts).name)
    note.add(f"{len(plan) - skipped} instance(s) sent as {', '.join(sorted(syntaxes))}")
    if skipped:
        note.add(f"{skipped} could not be decoded and were left out")
    return await writer.finish()


@audited("dicomweb.retrieve", "study")
async def retrieve_study(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _retrieve(request, note)


@audited("dicomweb.retrieve", "series")
async def retrieve_series(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _retrieve(request, note)


@audited("dicomweb.retrieve", "instance")
async def retrieve_instance(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _retrieve(request, note)


def _entries(cache: MetadataCache, request: web.Request, base: str,
             rows: list[InstanceRow]) -> list[bytes]:
    out = []
    for row in rows:
        entry = cache.entry(row.sha256, blob_path(request, row))
        if entry is not None:
            out.append(with_base(entry, url_path(base, row.study, row.series, row.sop)))
    return out


async def _metadata(request: web.Request, note: AccessNote) -> web.StreamResponse:
    if not accept.accepted(request.headers.get("Accept"), accept.json_acceptable):
        raise ApiError(406, f"metadata is available as {MEDIA_TYPE} only")
    rows = await find_instances(request, note)
    cache = MetadataCache(request.app[ROUTER_KEY].settings.data_dir)
    base = base_path(request)
    batches = [rows[i:i + METADATA_BATCH] for i in range(0, len(rows), METADATA_BATCH)]
    first = await asyncio.to_thread(_entries, cache, request, base, batches[0])
    if not first and len(batches) == 1:
        raise ApiError(404, "the stored objects of these instances are no longer kept here")
    response = web.StreamResponse(headers={"Content-Type": MEDIA_TYPE})
    response.enable_chunked_encoding()
    note.stream = response
    sent = 0
    try:
        await response.prepare(request)
        await response.write(b"[")
        for number, batch in enumerate(batches):
            entries = first if number == 0 else await asyncio.to_thread(
                _entries, cache, request, base, batch)
            if entries:
                await response.write((b"," if sent else b"") + b",".join(entries))
                sent += len(entries)
        await response.write(b"]")
        await response.write_eof()
    except ConnectionResetError:
        raise ClientGone(response) from None
    note.add(f"metadata of {sent} instance(s)")
    return response


@audited("dicomweb.metadata", "study")
async def study_metadata(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _metadata(request, note)


@audited("dicomweb.metadata", "series")
async def series_metadata(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _metadata(request, note)


@audited("dicomweb.metadata", "instance")
async def instance_metadata(request: web.Request, note: AccessNote) -> web.StreamResponse:
    return await _metadata(request, note)


TAGS = ("dicomweb",)
_S = "/dicom-web/studies/{study}"
_R = _S + "/series/{series}"
_I = _R + "/instances/{instance}"
_READ = "studies.read"
RENDER_QUERY = ("window", "viewport", "quality", "accept")


def _routes() -> list[Route]:
    table = [
        (_S, retrieve_study, "WADO-RS: a study's instances (multipart/related)"),
        (_R, retrieve_series, "WADO-RS: a series' instances (multipart/related)"),
        (_I, retrieve_instance, "WADO-RS: one instance (multipart/related)"),
        (_S + "/metadata", study_metadata, "WADO-RS: metadata of a study's instances"),
        (_R + "/metadata", series_metadata, "WADO-RS: metadata of a series' instances"),
        (_I + "/metadata", instance_metadata, "WADO-RS: metadata of one instance"),
        (_I + "/frames/{frames}", retrieve_frames, "WADO-RS: frames (1-based list)"),
        (_I + "/bulkdata/{path:[0-9A-Fa-f/]+}", retrieve_bulkdata,
         "WADO-RS: a bulk data value named by metadata"),
        (_I + "/rendered", rendered_instance, "WADO-RS: the instance rendered (first frame)"),
        (_I + "/frames/{frames}/rendered", rendered_frames, "WADO-RS: frames rendered"),
    ]
    routes = [Route("GET", path, handler, _READ, summary,
                    query=RENDER_QUERY if "rendered" in path else (), tags=TAGS)
              for path, handler, summary in table]
    for path, level in ((_S, "study"), (_R, "series"), (_I, "instance"),
                        (_I + "/frames/{frames}", "frame")):
        routes.append(Route("GET", path + "/thumbnail", thumbnail_of(level), _READ,
                            f"WADO-RS: thumbnail of the {level} (JPEG or PNG)",
                            query=RENDER_QUERY, tags=TAGS))
    return routes


ROUTES = _routes()
