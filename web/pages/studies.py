"""The studies pages: ``/studies`` (search form, results, paging) and ``/studies/{uid}``
(series, instances and where each was delivered; send it or a series to a destination). Each
view of PHI is recorded.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.ai_requests_queries import requests_for_study
from projections.studies_queries import (
    DELIVERY_STATUSES,
    FILTER_FIELDS,
    search_studies,
)
from web.api.common import ApiError, validate
from web.api.send import SendRequest, send_study
from web.api.studies import load_study, search_record, view_record
from web.auth import record_access
from web.filters import FilterError, study_filters
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.pages.jobs import HELPERS, page_window, pager
from web.ports import RouterPort
from web.render import render
from web.routes import Route


async def studies_page(request: web.Request) -> web.Response:
    query = request.query
    values: dict[str, Any] = {"form": {f: query.get(f, "") for f in FILTER_FIELDS},
                              "studies": [], "pager": None, **HELPERS}
    try:
        filters = study_filters(query, strict=False)
        limit, offset = page_window(query)
    except FilterError as exc:
        return render(request, "studies.html", status=400, flash=str(exc), flash_kind="error",
                      **values)
    router = request.app[ROUTER_KEY]
    await fresh(request, "studies")
    rows, total = await asyncio.to_thread(search_studies, router.view_db("studies"), filters,
                                          limit, offset)
    await record_access(request, search_record(filters, total))
    values.update(studies=rows, pager=pager("/studies", query, limit, offset, len(rows),
                                            total))
    return render(request, "studies.html", **values)


def sendable_destinations(router: RouterPort) -> list[str]:
    """Destinations a study can be sent to by hand (live, not AI processors)."""
    live = router.admin.snapshot().live_destinations()
    return sorted(name for name, d in live.items() if d.config.get("type") != "ai")


async def study_page(request: web.Request, **flash: Any) -> web.Response:
    study_uid = request.match_info["study_uid"]
    study = await load_study(request, study_uid)
    await record_access(request, view_record(study_uid, study))
    if study is None:
        return render(request, "error.html", status=404,
                      message="No study with this Study Instance UID.")
    by_series: dict[str, list[dict[str, Any]]] = {}
    for instance in study["instances"]:
        by_series.setdefault(instance["series_instance_uid"], []).append(instance)
    # A series whose instances include an image gets a thumbnail; others a placeholder.
    imaged = {uid: any(i["rows_"] is not None for i in instances)
              for uid, instances in by_series.items()}
    ai_requests = await asyncio.to_thread(
        requests_for_study, request.app[ROUTER_KEY].view_db("jobs"), study_uid)
    send_to = await asyncio.to_thread(sendable_destinations, request.app[ROUTER_KEY])
    return render(request, "study_detail.html", study=study, by_series=by_series,
                  statuses=DELIVERY_STATUSES, destinations=list(study["deliveries"]),
                  imaged=imaged, ai_requests=ai_requests, send_to=send_to, **HELPERS,
                  **flash)


def sent_message(result: dict[str, Any]) -> str:
    what = "series" if result["series_uid"] else "study"
    text = (f"Sending the {what} to {result['destination']}: {result['scheduled']} of "
            f"{result['instances']} instance(s) scheduled.")
    if result["already_waiting"]:
        text += f" {result['already_waiting']} already waiting for an attempt."
    return text


async def send(request: web.Request) -> web.Response:
    """The study page's "send to destination" form: HTMX swaps in the result; a plain form
    gets the study page with the result as its message."""
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    values = {"destination": form.get("destination", ""),
              "series_uid": form.get("series_uid") or None,
              "reason": form.get("reason", "")}
    try:
        body = validate(SendRequest, values)
        result = await send_study(request, request.match_info["study_uid"], body)
        message, kind, status = sent_message(result), "ok", 202
    except ApiError as exc:
        message, kind, status = exc.message, "error", exc.status
        if exc.fields:
            message = "; ".join(f"{k}: {v}" for k, v in exc.fields.items())
    if request.headers.get("HX-Request"):  # htmx swaps 2xx answers only
        return render(request, "_study_send_result.html", message=message, kind=kind)
    response = await study_page(request, flash=message, flash_kind=kind)
    response.set_status(status if kind == "error" else 200)
    return response


ROUTES = [
    Route("GET", "/studies", studies_page, "studies.read", "Study search"),
    Route("GET", "/studies/{study_uid}", study_page, "studies.read",
          "One study: series, instances, delivery status"),
    Route("POST", "/studies/{study_uid}/send", send, "jobs.write",
          "Send the study or one series to a destination"),
]
