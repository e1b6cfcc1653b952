"""The instance page ``/studies/{study}/series/{series}/instances/{sop}``: one stored
instance's tags (web/tag_tree.py), a rendered preview and its download. Each view is recorded
in the access log like a study page.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from router.application.sessions import AccessRecord
from web.api.common import ApiError
from web.auth import record_access
from web.dicomweb.lookup import InstanceRow, blob_path, query_instances
from web.filters import UID_RE
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.pages.jobs import HELPERS
from web.render import render
from web.routes import Route
from web.tag_tree import read_tags

PATH = "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def instance_uids(request: web.Request) -> tuple[str, str, str] | None:
    """Study, series and SOP Instance UIDs of the URL; None when one cannot be a UID."""
    uids = tuple(request.match_info[k] for k in ("study_uid", "series_uid", "sop_uid"))
    return uids if all(UID_RE.match(u) for u in uids) else None  # type: ignore[return-value]


async def find_instance(request: web.Request) -> InstanceRow | None:
    uids = instance_uids(request)
    if uids is None:
        return None
    await fresh(request, "studies")
    rows = await asyncio.to_thread(query_instances, request.app[ROUTER_KEY].view_db("studies"),
                                   *uids)
    return rows[0] if rows else None


def view_record(request: web.Request, row: InstanceRow | None) -> AccessRecord:
    if row is None:
        return AccessRecord(action="instance.view", object_type="instance",
                            object_id=request.match_info["sop_uid"][:64], outcome="not_found")
    return AccessRecord(action="instance.view", object_type="instance", object_id=row.sop,
                        study_instance_uid=row.study, patient_id=row.patient_id,
                        detail="tags shown")


async def instance_page(request: web.Request) -> web.Response:
    row = await find_instance(request)
    await record_access(request, view_record(request, row))
    if row is None:
        return render(request, "error.html", status=404,
                      message="No instance with these UIDs.")
    values: dict[str, Any] = {"row": row, "tags": None, "missing": ""}
    try:
        path = await asyncio.to_thread(blob_path, request, row)
    except ApiError as exc:
        path, values["missing"] = None, exc.message
    if path is None:
        values["missing"] = values["missing"] or "The stored object is no longer kept here."
    else:
        values["tags"] = await asyncio.to_thread(read_tags, path)
    return render(request, "instance.html", **values, **HELPERS)


ROUTES = [
    Route("GET", PATH, instance_page, "studies.read",
          "One instance: its tags (private tags and bulk data elided)"),
]
