"""The jobs page's bulk form (``_jobs_bulk.html``): count, requeue or cancel every delivery
matching a destination, status, time range and study, with a reason. HTMX swaps the form
with its result; without HTMX a small page shows the result and the form again.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import ValidationError

from router.application.bulk import OPERATIONS
from web.api.common import ApiError, field_errors
from web.api.deliveries import BulkRequest, bulk_action
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

FIELDS = ("destination", "status", "since", "until", "study_uid", "reason")
DONE = {"requeue": "Requeued", "cancel": "Cancelled"}


def request_of(form: dict[str, str], operation: str) -> BulkRequest:
    """The API's request model from the form (empty fields are "any")."""
    values: dict[str, Any] = {k: form[k].strip() for k in FIELDS if form.get(k, "").strip()}
    values["all"] = form.get("all") == "on"
    values["dry_run"] = form.get("go") == "count"
    try:
        return BulkRequest.model_validate(values)
    except ValidationError as exc:
        fields = field_errors(exc, BulkRequest)
        raise ApiError(422, "; ".join(f"{k}: {v}" for k, v in fields.items()),
                       fields) from None


def list_url(request: web.Request) -> str:
    """The jobs list the form was sent from (its filters kept), to see the new statuses."""
    current = urlsplit(request.headers.get("HX-Current-URL", ""))
    if current.path != "/jobs":
        return "/jobs"
    return "/jobs" + (f"?{current.query}" if current.query else "")


def message(result: dict[str, Any]) -> str:
    if result["dry_run"]:
        return (f"{result['matched']} deliveries match; nothing was changed"
                f" (press {result['operation'].capitalize()} to act).")
    text = (f"{DONE[result['operation']]} {result['affected']} of {result['matched']}"
            " matching deliveries.")
    if result["skipped"]:
        text += f" {result['skipped']} changed meanwhile and were left alone."
    return text


async def bulk(request: web.Request) -> web.Response:
    posted = await request.post()
    form = {k: v for k, v in posted.items() if isinstance(v, str) and k != "csrf_token"}
    operation = form.get("operation", "")
    htmx = bool(request.headers.get("HX-Request"))
    status, kind = 200, "ok"
    try:
        if operation not in OPERATIONS:
            raise ApiError(422, "operation: choose requeue or cancel",
                           {"operation": "choose requeue or cancel"})
        body = request_of(form, operation)
        result = await bulk_action(request, operation, body, actor_of(request))
        text = message(result)
    except ApiError as exc:
        status, kind, text = exc.status, "error", exc.message
    names = await asyncio.to_thread(lambda: sorted(
        request.app[ROUTER_KEY].admin.snapshot().destinations))
    values: dict[str, Any] = {"bulk_form": form, "bulk_message": text, "bulk_kind": kind,
                              "destination_names": names, "reload_url": list_url(request)}
    if not htmx:
        return render(request, "jobs_bulk.html", status=status, **values)
    return render(request, "_jobs_bulk.html", **values)  # htmx swaps 2xx answers only


ROUTES = [
    Route("POST", "/jobs/bulk", bulk, "jobs.write",
          "Count, requeue or cancel every delivery matching a filter, with a reason"),
]
