"""Finding what a DICOMweb URL names in the studies view (its queries:
projections/dicomweb_queries.py): studies, series and instances with the digest of their stored
object, and the URL paths that point back at them.

UIDs from a URL are only ever SQL parameters; UIDs from the view (received, hence hostile) are
percent-encoded when they go into a URL, and only a checked SHA-256 digest becomes a file path.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from projections.db import ViewDatabase
from projections.dicomweb_queries import (
    SERIES,
    STUDY,
    InstanceRow,
    missing_level,
    query_instances,
)
from router.storage.blobs import BlobCorruptError, BlobError
from web.api.common import ApiError
from web.dicomweb.access import AccessNote
from web.freshness import fresh
from web.keys import ROUTER_KEY

ROOT = "/dicom-web"
_PATH_UID = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable, no spaces: what a UID segment may be
_PREFIX = re.compile(r"^(/(?!\.\.?(/|$))[A-Za-z0-9._~-]+){0,8}$")  # no . or .. segments

def path_uid(request: web.Request, name: str) -> str:
    """A UID from the URL path; 400 when it cannot be one."""
    value = request.match_info[name]
    if not _PATH_UID.match(value):
        raise ApiError(400, f"{name.replace('_', ' ')} is not a valid UID")
    return value


def base_path(request: web.Request) -> str:
    """The DICOMweb root as seen by the client: ``/dicom-web`` behind the reverse proxy's
    ``X-Forwarded-Prefix`` (checked: a few plain path segments), never an absolute URL.
    """
    prefix = request.headers.get("X-Forwarded-Prefix", "").rstrip("/")
    return (prefix if _PREFIX.match(prefix) else "") + ROOT


def url_path(base: str, study: str, series: str | None = None, sop: str | None = None) -> str:
    path = f"{base}/studies/{quote(study, safe='')}"
    if series is not None:
        path += f"/series/{quote(series, safe='')}"
    if sop is not None:
        path += f"/instances/{quote(sop, safe='')}"
    return path


def _missing(db: ViewDatabase, study: str, series: str | None) -> ApiError:
    """404 naming the first level of the URL that does not exist."""
    missing = missing_level(db, study, series)
    if missing == STUDY:
        return ApiError(404, "no study with this Study Instance UID")
    if missing == SERIES:
        return ApiError(404, "no series with this Series Instance UID in this study")
    return ApiError(404, "no instance with this SOP Instance UID in this series")


def studies_db(request: web.Request) -> ViewDatabase:
    return request.app[ROUTER_KEY].view_db("studies")


async def find_instances(request: web.Request, note: AccessNote) -> list[InstanceRow]:
    """The instances the URL names (study, series or one instance); 404 when none. The note
    learns the study and patient.
    """
    study = path_uid(request, "study")
    series = path_uid(request, "series") if "series" in request.match_info else None
    sop = path_uid(request, "instance") if "instance" in request.match_info else None
    note.about(study, None, sop or series or study)
    db = studies_db(request)
    await fresh(request, "studies")  # every receipt acknowledged before this request
    rows = await asyncio.to_thread(query_instances, db, study, series, sop)
    if not rows:
        raise await asyncio.to_thread(_missing, db, study, series)
    note.patient_id = rows[0].patient_id
    return rows


def blob_path(request: web.Request, row: InstanceRow) -> Path | None:
    """Where the instance's bytes are, or None when retention has deleted them. With a remote
    blob store this may download: call it from a thread, not the event loop."""
    if not row.available:
        return None
    try:
        return request.app[ROUTER_KEY].blobs.fetch(row.sha256)
    except BlobCorruptError:
        raise ApiError(502, "the stored object of this instance failed its integrity check"
                       ) from None
    except BlobError:
        raise ApiError(503, "the blob store cannot be read at the moment") from None


def require_blob(request: web.Request, row: InstanceRow) -> Path:
    path = blob_path(request, row)
    if path is None:
        raise ApiError(404, "the stored object of this instance is no longer kept here")
    return path


async def one_instance(request: web.Request, note: AccessNote) -> tuple[InstanceRow, Path]:
    rows = await find_instances(request, note)
    return rows[0], await asyncio.to_thread(require_blob, request, rows[0])
