"""Finding what a DICOMweb URL names in the studies view: studies, series and instances with
the digest of their stored object, and the URL paths that point back at them.

UIDs from a URL are only ever SQL parameters; UIDs from the view (received, hence hostile) are
percent-encoded when they go into a URL, and only a checked SHA-256 digest becomes a file path.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from projections.db import ViewDatabase
from router.storage.blobs import BlobCorruptError, BlobError
from web.api.common import ApiError
from web.dicomweb.access import AccessNote
from web.freshness import fresh
from web.keys import ROUTER_KEY

ROOT = "/dicom-web"
_PATH_UID = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable, no spaces: what a UID segment may be
_PREFIX = re.compile(r"^(/(?!\.\.?(/|$))[A-Za-z0-9._~-]+){0,8}$")  # no . or .. segments

INSTANCE_SQL = (
    "SELECT i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid, i.sop_class_uid,"
    " i.transfer_syntax_uid, i.sha256, i.size, i.number_of_frames, i.rows_, i.available,"
    " st.patient_id FROM instances i"
    " JOIN series se ON se.series_instance_uid = i.series_instance_uid"
    " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
)
INSTANCE_ORDER = (
    " ORDER BY (se.series_number IS NULL), se.series_number, i.series_instance_uid,"
    " (i.instance_number IS NULL), i.instance_number, i.sop_instance_uid"
)


@dataclass(frozen=True)
class InstanceRow:
    """One stored instance as the studies view knows it."""

    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str
    sha256: str
    size: int
    frames: int
    has_pixels: bool  # the index has Rows: an image
    available: bool
    patient_id: str | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> InstanceRow:
        return cls(row["study_instance_uid"], row["series_instance_uid"],
                   row["sop_instance_uid"], row["sop_class_uid"], row["transfer_syntax_uid"],
                   row["sha256"], int(row["size"]), int(row["number_of_frames"] or 1),
                   row["rows_"] is not None, bool(row["available"]), row["patient_id"])


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


def query_instances(db: ViewDatabase, study: str, series: str | None = None,
                    sop: str | None = None) -> list[InstanceRow]:
    where, params = " WHERE i.study_instance_uid = ?", [study]
    if series is not None:
        where += " AND i.series_instance_uid = ?"
        params.append(series)
    if sop is not None:
        where += " AND i.sop_instance_uid = ?"
        params.append(sop)
    return [InstanceRow.of(r) for r in db.query(INSTANCE_SQL + where + INSTANCE_ORDER, params)]


def _missing(db: ViewDatabase, study: str, series: str | None) -> ApiError:
    """404 naming the first level of the URL that does not exist."""
    if not db.query("SELECT 1 FROM studies WHERE study_instance_uid = ?", (study,)):
        return ApiError(404, "no study with this Study Instance UID")
    if series is not None and not db.query(
            "SELECT 1 FROM series WHERE series_instance_uid = ? AND study_instance_uid = ?",
            (series, study)):
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
