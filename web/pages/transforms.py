"""The transforms pages: ``/transforms`` (each transform, its options and who names it),
``/transforms/preview`` (the dry run: a stored header before and after, side by side, changes
highlighted; recorded as an access) and ``/transforms/reidentify`` (an audited lookup).
Creating and editing go through the API or the TOML file.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from router.application.reidentification import lookup_record
from web.api.common import ApiError, run_command
from web.api.transforms import PreviewBody, run_preview, transform_items
from web.auth import record_access
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route


async def transforms_page(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    items = await asyncio.to_thread(transform_items, router)
    for item in items:
        item["options"] = json.dumps({k: v for k, v in item.items() if k not in (
            "name", "kind", "description", "version", "from_config", "used_by")},
            sort_keys=True)
    message = {"created": "Transform created.", "saved": "Transform saved.",
               "deleted": "Transform deleted."}.get(request.query.get("ok", ""), "")
    return render(request, "transforms.html", transforms=items, message=message)


async def preview_page(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    snapshot = router.admin.snapshot()
    form = {k: request.query.get(k, "").strip()[:64]
            for k in ("sop_instance_uid", "transform", "destination")}
    values: dict[str, Any] = {
        "form": form, "result": None, "transform_names": sorted(snapshot.transforms),
        "destination_names": sorted(n for n, s in snapshot.live_destinations().items()
                                    if s.config.get("type") != "ai")}
    if not form["sop_instance_uid"] or not (form["transform"] or form["destination"]):
        return render(request, "transform_preview.html", **values)  # the form, to fill in
    try:
        values["result"] = await run_preview(request, PreviewBody(**form))
    except ApiError as exc:
        return render(request, "transform_preview.html", status=exc.status, flash=exc.message,
                      flash_kind="error", **values)
    return render(request, "transform_preview.html", **values)


async def reidentify_page(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    form = {k: request.query.get(k, "").strip()[:128]
            for k in ("project", "kind", "pseudonym", "reason")}
    form["kind"] = form["kind"] or "patient"
    values: dict[str, Any] = {"form": form, "found": None}
    if not (form["project"] and form["pseudonym"]):
        return render(request, "transform_reidentify.html", **values)
    if not form["reason"]:
        return render(request, "transform_reidentify.html", status=422, flash_kind="error",
                      flash="Reason: required (it is recorded with the lookup).", **values)
    found: dict[str, str] | None = None
    try:
        found = await run_command(router.reidentification.lookup, form["project"],
                                  form["kind"], form["pseudonym"])
    except ApiError as exc:
        return render(request, "transform_reidentify.html", status=exc.status,
                      flash=exc.message, flash_kind="error", **values)
    finally:
        await record_access(request, lookup_record(form["project"], form["kind"],
                                                   form["pseudonym"], found, form["reason"]))
    return render(request, "transform_reidentify.html", **{**values, "found": found})


ROUTES = [
    Route("GET", "/transforms", transforms_page, "transforms.read", "Transforms"),
    Route("GET", "/transforms/preview", preview_page, "transforms.preview",
          "Dry run of a transform or a destination's chain on a stored instance"),
    Route("GET", "/transforms/reidentify", reidentify_page, "reidentification.lookup",
          "Look up the originals behind a pseudonym (audited)"),
]
