"""Download a study, a series or one instance as a ZIP of its stored DICOM files, streamed: an
entry is written to the answer a chunk at a time while it is read from the blob store, so a
big study never sits in memory. Entry names are made from validated UIDs (digits and dots),
never from received strings as they are; a DICOMDIR is not written. Each download is recorded
in the access log as an export with the number of instances sent.
"""

from __future__ import annotations

import asyncio
import io
import logging
import zipfile
from pathlib import Path
from typing import IO

from aiohttp import web

from router.application.sessions import AccessRecord
from web.auth import record_access
from web.dicomweb.lookup import InstanceRow, blob_path, query_instances
from web.dicomweb.stow import is_uid
from web.filters import UID_RE
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read from a stored file (and sent) at a time
LEVELS = ("study_uid", "series_uid", "sop_uid")


class _Sink(io.RawIOBase):
    """Where zipfile writes: the handler sends what piled up after every chunk."""

    def __init__(self) -> None:
        super().__init__()
        self._pieces: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._pieces.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._pieces)
        self._pieces.clear()
        return data


def entry_name(row: InstanceRow, number: int) -> str:
    """``<series UID>/<SOP Instance UID>.dcm``; a UID that is not digits and dots (stored
    before UIDs were checked) is replaced by a counter, never used as it came."""
    series = row.series if is_uid(row.series) else "series"
    sop = row.sop if is_uid(row.sop) else f"instance-{number:05d}"
    return f"{series}/{sop}.dcm"


def archive_name(uids: list[str]) -> str:
    level = ("study", "series", "instance")[len(uids) - 1]
    return f"{level}-{uids[-1]}.zip"


def _copy_chunk(source: IO[bytes], target: IO[bytes]) -> bool:
    data = source.read(CHUNK)
    if data:
        target.write(data)
    return bool(data)


async def _send_entry(response: web.StreamResponse, archive: zipfile.ZipFile, sink: _Sink,
                      path: Path, name: str) -> None:
    source = await asyncio.to_thread(path.open, "rb")
    try:
        target = await asyncio.to_thread(archive.open, name, "w", force_zip64=True)
        try:
            while await asyncio.to_thread(_copy_chunk, source, target):
                await response.write(sink.take())
        finally:
            await asyncio.to_thread(target.close)
        await response.write(sink.take())
    finally:
        await asyncio.to_thread(source.close)


async def _stream_zip(request: web.Request, response: web.StreamResponse,
                      rows: list[InstanceRow]) -> int:
    """Send the ZIP; the number of instances in it (a file retention deleted is left out)."""
    response.enable_chunked_encoding()
    await response.prepare(request)
    sink = _Sink()
    sent = 0
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for number, row in enumerate(rows, 1):
            path = await asyncio.to_thread(blob_path, request, row)
            if path is not None:
                await _send_entry(response, zf, sink, path, entry_name(row, number))
                sent += 1
    await response.write(sink.take())  # the central directory
    await response.write_eof()
    return sent


def _uids(request: web.Request) -> list[str] | None:
    uids = [request.match_info[k] for k in LEVELS if k in request.match_info]
    return uids if all(UID_RE.match(u) for u in uids) else None


def export_record(uids: list[str] | None, object_type: str, rows: list[InstanceRow],
                  outcome: str, detail: str) -> AccessRecord:
    return AccessRecord(action="study.export", object_type=object_type,
                        object_id=uids[-1] if uids else "", outcome=outcome,
                        study_instance_uid=uids[0] if uids else None,
                        patient_id=rows[0].patient_id if rows else None, detail=detail)


async def download(request: web.Request) -> web.StreamResponse:
    """The study, series or instance the URL names, as a ZIP (404 when unknown)."""
    uids = _uids(request)
    object_type = ("study", "series", "instance")[len(request.match_info) - 1]
    rows: list[InstanceRow] = []
    if uids is not None:
        await fresh(request, "studies")
        rows = await asyncio.to_thread(query_instances,
                                       request.app[ROUTER_KEY].view_db("studies"), *uids)
    if uids is None or not rows:
        await record_access(request, export_record(uids, object_type, rows, "not_found",
                                                   "ZIP download: nothing to send"))
        raise web.HTTPNotFound(text=f"No {object_type} with these UIDs.")
    response = web.StreamResponse(headers={
        "Content-Type": "application/zip",
        "Content-Disposition": f'attachment; filename="{archive_name(uids)}"'})
    outcome, detail = "failure", f"ZIP download of {len(rows)} instance(s) failed"
    try:
        sent = await _stream_zip(request, response, rows)
        outcome, detail = "success", f"ZIP download: {sent} of {len(rows)} instance(s) sent"
    except (ConnectionResetError, asyncio.CancelledError):
        detail = f"ZIP download of {len(rows)} instance(s): the client went away"
        raise
    except Exception as exc:
        if not response.prepared:
            raise  # e.g. the blob store cannot be read: the error middleware answers
        # Headers are gone: end the body early and say why in the log (the type only).
        logger.error("a ZIP download failed while streaming: %s", type(exc).__name__)
    finally:
        await asyncio.shield(record_access(request, export_record(
            uids, object_type, rows, outcome, detail)))
    return response


ROUTES = [
    Route("GET", "/studies/{study_uid}/download", download, "studies.read",
          "Download a study as a ZIP of its DICOM files"),
    Route("GET", "/studies/{study_uid}/series/{series_uid}/download", download, "studies.read",
          "Download a series as a ZIP"),
    Route("GET", "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/download",
          download, "studies.read", "Download one instance as a ZIP"),
]
