"""Upload DICOM files from the browser (the Studies page's form, ``POST /studies/upload``).

Each file of the form is spooled as it arrives and then takes the STOW-RS path of
web/dicomweb/stow.py (the same checks, the Receiver with the user as actor and source
``stow``, the same ``study.store`` access records), so it is received, routed and audited like
any STOW-RS. Unlike a STOW-RS request, one bad file does not refuse the others: the answer
lists every file, stored or refused with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any

from aiohttp import BodyPartReader, web

from router.application.receive import STATUS_SUCCESS
from router.application.sessions import AccessRecord
from web.auth import actor_of, record_access
from web.dicomweb.multipart_in import MultipartError, Part, SpoolWriteError, discard, spool_stream
from web.dicomweb.stow import Candidate, Outcome, access_records, inspect_part, store_all
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route
from web.security import CSRF_HEADER

logger = logging.getLogger(__name__)

FIELD = "files"
MAX_FILES = 1000
MAX_BYTES = 4 * 1024**3  # in all, as a STOW-RS request
CHUNK = 1 << 20
MAX_NAME = 120  # characters of a file name shown back (it is only ever shown, escaped)


class UploadError(Exception):
    """The form cannot be taken (not a form upload, too many files or bytes): a 400/413."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FileResult:
    """One uploaded file: its name as the browser gave it, and what happened to it."""

    name: str
    stored: bool = False
    sop_instance_uid: str = ""
    study_uid: str = ""
    reason: str = ""


async def _form_files(request: web.Request) -> AsyncIterator[tuple[str, Any]]:
    """(file name, chunk reader) of each file field, streamed from the body. A form sent
    without the CSRF header was read whole by the CSRF check (bounded by client_max_size)."""
    if request.headers.get(CSRF_HEADER) is None:
        form = await request.post()
        for value in form.getall(FIELD, []):
            if isinstance(value, web.FileField) and value.filename:  # "": none chosen
                yield value.filename, _file_reader(value.file)
        return
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader) and part.name == FIELD and part.filename:
            yield part.filename, part.read_chunk
        elif isinstance(part, BodyPartReader):
            await part.release()


def _file_reader(file: IO[bytes]) -> Any:
    async def read() -> bytes:
        return await asyncio.to_thread(file.read, CHUNK)
    return read


async def spool_files(request: web.Request) -> list[tuple[str, Part]]:
    """Every file of the form in a spool file; nothing is left behind on an error."""
    if not request.content_type.startswith("multipart/form-data"):
        raise UploadError(400, "send the files as multipart/form-data (field \"files\")")
    spool_dir = request.app[ROUTER_KEY].blobs.spool_dir
    spooled: list[tuple[str, Part]] = []
    total = 0
    try:
        async for name, read in _form_files(request):
            if len(spooled) >= MAX_FILES:
                raise UploadError(413, f"at most {MAX_FILES} files at once")
            part = await spool_stream({"content-type": "application/dicom"}, spool_dir, read)
            spooled.append((name[:MAX_NAME], part))
            total += part.size
            if total > MAX_BYTES:
                raise UploadError(413, f"at most {MAX_BYTES} bytes at once")
    except ValueError as exc:  # aiohttp: a malformed multipart body
        await asyncio.to_thread(discard, [p for _, p in spooled])
        raise UploadError(400, f"the upload is not a well-formed form: {exc}") from None
    except BaseException:
        await asyncio.to_thread(discard, [p for _, p in spooled])
        raise
    if not spooled:
        raise UploadError(400, "choose at least one file (field \"files\")")
    return spooled


def _inspect(spooled: list[tuple[str, Part]]) -> tuple[list[FileResult], list[Candidate]]:
    """A result per file; the DICOM ones as STOW-RS candidates (others are refused here)."""
    results, candidates = [], []
    for number, (name, part) in enumerate(spooled, 1):
        try:
            candidates.append(inspect_part(part, number))
            results.append(FileResult(name))
        except MultipartError as exc:
            part.path.unlink(missing_ok=True)
            why = str(exc).split(" ", 2)[-1]  # "part N is not a DICOM ..." -> "is not ..."
            results.append(FileResult(name, reason=f"the file {why}"))
    return results, candidates


def _reason(outcome: Outcome) -> str:
    return f"refused (0x{outcome.status:04X}): {outcome.reason or 'not stored'}"


async def store_files(request: web.Request, spooled: list[tuple[str, Part]]
                      ) -> list[FileResult]:
    results, candidates = await asyncio.to_thread(_inspect, spooled)
    router = request.app[ROUTER_KEY]
    outcomes = await asyncio.to_thread(store_all, router.receiver, candidates, None,
                                       actor_of(request))
    pending = iter(outcomes)
    for result in results:
        if result.reason:
            continue
        outcome = next(pending)
        result.sop_instance_uid = outcome.sop_instance_uid
        result.study_uid = outcome.study_uid
        result.stored = outcome.status == STATUS_SUCCESS
        result.reason = "" if result.stored else _reason(outcome)
    if any(r.stored for r in results):
        await fresh(request, "studies")  # the results link to studies the view must hold
    for record in access_records(outcomes, None):
        await record_access(request, record)
    not_dicom = len(results) - len(candidates)
    if not_dicom:
        await record_access(request, AccessRecord(
            action="study.store", object_type="study", outcome="failure",
            detail=f"browser upload: {not_dicom} file(s) refused, not DICOM Part 10"))
    return results


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    """The whole form refused: the full page with its 4xx/5xx status; for HTMX the fragment
    (htmx swaps 2xx answers only, and the message must be seen where the results go)."""
    if request.headers.get("HX-Request"):
        return render(request, "_upload_results.html", error=message, results=[])
    return render(request, "upload.html", status=status, error=message, results=[])


async def upload(request: web.Request) -> web.Response:
    template = "_upload_results.html" if request.headers.get("HX-Request") else "upload.html"
    try:
        spooled = await spool_files(request)
    except UploadError as exc:
        return _refused(request, exc.status, str(exc))
    except SpoolWriteError as exc:
        logger.error("browser upload: spool write failed: %s",
                     exc.strerror or type(exc).__name__)
        return _refused(request, 503, "out of resources: the upload could not be written to disk")
    results = await store_files(request, spooled)
    stored = sum(1 for r in results if r.stored)
    return render(request, template, results=results, stored=stored, error="")


ROUTES = [
    Route("POST", "/studies/upload", upload, "studies.store",
          "Upload DICOM files from a browser form (each file through the STOW-RS path)"),
]
