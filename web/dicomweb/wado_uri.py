"""WADO-URI at ``/wado`` (PS3.18 chapter 9): ``requestType=WADO`` with ``studyUID``,
``seriesUID`` and ``objectUID``; ``contentType`` application/dicom (``transferSyntax``: a UID or
``*`` for as stored; by default Explicit VR Little Endian when it can be produced, else as
stored) or image/jpeg / image/png (``frameNumber``, ``rows``, ``columns``, ``windowCenter``,
``windowWidth``, ``imageQuality``, ``region``). Without contentType an image is sent as JPEG
and any other object as DICOM. Each call is one access record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from pydicom.uid import UID

from web.api.common import ApiError
from web.dicomweb import accept
from web.dicomweb.access import AccessNote, audited
from web.dicomweb.lookup import InstanceRow, query_instances, require_blob, studies_db
from web.dicomweb.rendered import RenderError, RenderOptions, Viewport, render
from web.dicomweb.stored import DecodeError, StoredInstance, decodable, explicit_le, open_instance
from web.freshness import fresh
from web.routes import Route

KNOWN = frozenset({
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax",
    "frameNumber", "rows", "columns", "windowCenter", "windowWidth", "imageQuality", "region",
    "charset", "annotation",
})
CONTENT_TYPES = (accept.DICOM, "image/jpeg", "image/png")
MAX_SIDE = 8192


def _check_query(query: Mapping[str, str]) -> tuple[str, str, str]:
    unknown = sorted(set(query) - KNOWN)
    if unknown:
        raise ApiError(400, f"parameter {unknown[0][:64]!r} is not supported")
    if query.get("requestType") != "WADO":
        raise ApiError(400, "requestType must be WADO")
    uids = []
    for name in ("studyUID", "seriesUID", "objectUID"):
        value = query.get(name, "")
        if not 0 < len(value) <= 64 or not value.isprintable() or " " in value:
            raise ApiError(400, f"{name} is missing or not a valid UID")
        uids.append(value)
    return uids[0], uids[1], uids[2]


def _content_type(query: Mapping[str, str], row: InstanceRow) -> str:
    asked = [t.split(";")[0].strip().lower() for t in query.get("contentType", "").split(",")]
    for media in filter(None, asked):
        if media in CONTENT_TYPES:
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg" if row.has_pixels or media == "image/*" else accept.DICOM
    if any(asked):
        raise ApiError(406, "contentType must be application/dicom, image/jpeg or image/png")
    return "image/jpeg" if row.has_pixels else accept.DICOM


def _int(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be {low}..{high}")
    return value


def _window(query: Mapping[str, str]) -> tuple[float, float, str] | None:
    if ("windowCenter" in query) != ("windowWidth" in query):
        raise ApiError(400, "windowCenter and windowWidth go together")
    if "windowCenter" not in query:
        return None
    try:
        center, width = float(query["windowCenter"]), float(query["windowWidth"])
    except ValueError:
        raise ApiError(400, "windowCenter and windowWidth must be numbers") from None
    if width < 1:
        raise ApiError(400, "windowWidth must be at least 1")
    return center, width, "linear"


def _region(query: Mapping[str, str], inst: StoredInstance) -> tuple[int, int, int, int] | None:
    """region=x1,y1,x2,y2 as fractions of the image, as a pixel box (sx, sy, sw, sh)."""
    if "region" not in query:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in query["region"].split(","))
    except ValueError:
        raise ApiError(400, "region must be four numbers x1,y1,x2,y2 between 0 and 1") from None
    if not 0 <= x1 < x2 <= 1 or not 0 <= y1 < y2 <= 1:
        raise ApiError(400, "region must be four numbers x1,y1,x2,y2 between 0 and 1")
    cols, rows = int(inst.header.get("Columns", 1)), int(inst.header.get("Rows", 1))
    return (int(x1 * cols), int(y1 * rows), max(1, round((x2 - x1) * cols)),
            max(1, round((y2 - y1) * rows)))


def _options(query: Mapping[str, str], media: str, inst: StoredInstance) -> RenderOptions:
    rows = _int(query, "rows", 1, MAX_SIDE)
    columns = _int(query, "columns", 1, MAX_SIDE)
    region = _region(query, inst)
    viewport = None
    if region and not (rows or columns):  # a region alone keeps its own size
        viewport = Viewport(region[2], region[3], region)
    elif rows or columns or region:  # rows and columns are the largest size wanted
        viewport = Viewport(columns or MAX_SIDE, rows or MAX_SIDE, region)
    quality = _int(query, "imageQuality", 1, 100) or 90
    return RenderOptions(media, quality, _window(query), viewport)


async def _image(request: web.Request, note: AccessNote, media: str, path: Path
                 ) -> web.Response:
    inst = await asyncio.to_thread(open_instance, path)
    if inst.pixels is None:
        raise ApiError(406, "this object has no pixel data to send as an image")
    frame = _int(request.query, "frameNumber", 1, inst.frames) or 1
    options = _options(request.query, media, inst)
    try:
        image = await asyncio.to_thread(render, inst, frame - 1, options)
    except (DecodeError, RenderError) as exc:
        raise ApiError(406 if isinstance(exc, DecodeError) else 400, str(exc)) from None
    note.add(f"frame {frame} rendered as {media}")
    return web.Response(body=image, headers={"Content-Type": media})


async def _dicom(request: web.Request, note: AccessNote, row: InstanceRow, path: Path
                 ) -> web.StreamResponse:
    asked = request.query.get("transferSyntax")
    choices = [asked] if asked else [accept.EXPLICIT_LE, accept.AS_STORED]
    ts = accept.dicom_choice(choices, row.transfer_syntax, decodable(row.transfer_syntax))
    if ts is None:
        raise ApiError(406, f"the object is stored as {UID(row.transfer_syntax).name} and"
                            " cannot be sent in the transfer syntax asked for")
    note.add(f"sent as {UID(ts).name}")
    headers = {"Content-Type": accept.DICOM}
    if ts != row.transfer_syntax:
        try:
            return web.Response(body=await asyncio.to_thread(explicit_le, path),
                                headers=headers)
        except DecodeError as exc:
            if asked:
                raise ApiError(406, str(exc)) from None
            note.detail = f"sent as {UID(row.transfer_syntax).name}"
    return web.FileResponse(path, headers=headers)


@audited("wado.retrieve", "instance")
async def wado_uri(request: web.Request, note: AccessNote) -> web.StreamResponse:
    study, series, sop = _check_query(request.query)
    note.about(study, None, sop)
    await fresh(request, "studies")
    rows = await asyncio.to_thread(query_instances, studies_db(request), study, series, sop)
    if not rows:
        raise ApiError(404, "no instance with these study, series and object UIDs")
    row = rows[0]
    note.patient_id = row.patient_id
    path = await asyncio.to_thread(require_blob, request, row)
    media = _content_type(request.query, row)
    if media == accept.DICOM:
        return await _dicom(request, note, row, path)
    return await _image(request, note, media, path)


ROUTES = [
    Route("GET", "/wado", wado_uri, "studies.read",
          "WADO-URI: one object as DICOM, JPEG or PNG",
          query=tuple(sorted(KNOWN)), tags=("dicomweb",)),
]
