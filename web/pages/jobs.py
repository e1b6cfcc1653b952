"""The jobs pages: the per-instance list ``/jobs?view=instances`` (filter form, table,
paging; web/pages/transfers.py answers ``/jobs`` and hands this view over) and
``/jobs/{job_id}`` (receipt, routing, deliveries with requeue / cancel, event timeline).
Reads are the API's; each view of PHI is recorded. Also the small formatting helpers every
page of this kind hands its template.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from pydicom.uid import UID

from projections.ai_requests_queries import requests_for_job
from projections.jobs_queries import (
    FILTER_FIELDS,
    JOB_STATUSES,
    JobFilters,
    list_jobs,
)
from router.domain.delivery_states import FINAL_STATES
from web.api.common import ApiError
from web.api.jobs import change_delivery, list_record, load_job, view_record
from web.auth import record_access
from web.filters import FilterError, job_filters
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

PAGE_SIZE = 50
MAX_PAGE = 500
DONE = {"requeue": "Requeued the delivery to {}.", "cancel": "Cancelled the delivery to {}."}
FINAL = frozenset(FINAL_STATES)


def when(timestamp: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` (UTC), or an empty string."""
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """A rough age: ``42 s``, ``7 min``, ``3 h``, ``2 d``."""
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def filesize(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def uid_name(value: str | None) -> str:
    """A SOP class or transfer syntax by name (pydicom's UID dictionary), else the UID."""
    if not value:
        return ""
    return str(UID(value).name)


HELPERS: dict[str, Any] = {"when": when, "duration": duration, "filesize": filesize,
                           "uid_name": uid_name}


def page_window(query: Mapping[str, str]) -> tuple[int, int]:
    """``limit`` (1..MAX_PAGE, default PAGE_SIZE) and ``offset`` of a page's table."""
    try:
        limit = int(query.get("limit") or PAGE_SIZE)
        offset = int(query.get("offset") or 0)
    except ValueError:
        raise FilterError("limit", "limit and offset must be whole numbers") from None
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise FilterError("limit", f"limit must be 1..{MAX_PAGE} and offset 0 or more")
    return limit, offset


def pager(path: str, query: Mapping[str, str], limit: int, offset: int, shown: int,
          total: int) -> dict[str, Any]:
    """Links to the previous and next pages, keeping the filters of ``query``."""
    kept = {k: v for k, v in query.items() if k != "offset" and v}

    def link(at: int) -> str:
        return path + "?" + urlencode({**kept, "offset": at} if at else kept)

    return {"first": offset + 1 if shown else 0, "last": offset + shown, "total": total,
            "prev": link(max(0, offset - limit)) if offset > 0 else None,
            "next": link(offset + limit) if offset + shown < total else None}


async def instances_page(request: web.Request) -> web.Response:
    """The per-instance jobs list (``/jobs?view=instances``; /jobs itself lists transfers)."""
    query = request.query
    values: dict[str, Any] = {"form": {f: query.get(f, "") for f in FILTER_FIELDS},
                              "statuses": JOB_STATUSES, "jobs": [], "pager": None, **HELPERS}
    router = request.app[ROUTER_KEY]
    # The snapshot may refresh from the admin log: not on the event loop.
    values["destination_names"] = await asyncio.to_thread(
        lambda: sorted(router.admin.snapshot().destinations))
    try:
        filters: JobFilters = job_filters(query, strict=False)
        limit, offset = page_window(query)
    except FilterError as exc:
        return render(request, "jobs.html", status=400, flash=str(exc), flash_kind="error",
                      **values)
    await fresh(request, "jobs")
    rows, total = await asyncio.to_thread(list_jobs, router.view_db("jobs"), filters,
                                          limit, offset)
    await record_access(request, list_record(filters, total))
    values.update(jobs=rows, pager=pager("/jobs", query, limit, offset, len(rows), total))
    return render(request, "jobs.html", **values)


async def job_page(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = await load_job(request, job_id)
    await record_access(request, view_record(job_id, job))
    if job is None:
        return render(request, "error.html", status=404, message="No job with this id.")
    flash = ""
    done, target = request.query.get("done", ""), request.query.get("destination", "")
    if done in DONE and any(d["destination"] == target for d in job["deliveries"]):
        flash = DONE[done].format(target)
    ai_requests = await asyncio.to_thread(
        requests_for_job, request.app[ROUTER_KEY].view_db("jobs"), job["job_id"])
    return render(request, "job_detail.html", job=job, flash=flash, final=FINAL,
                  ai_requests=ai_requests, **HELPERS)


async def live_fragment(request: web.Request, message: str = "", kind: str = "ok"
                              ) -> web.Response:
    """A job's deliveries and timeline (polled while any delivery is still open)."""
    job = await load_job(request, request.match_info["job_id"])
    if job is None:
        return render(request, "error.html", status=404, message="No job with this id.")
    return render(request, "_jobs_live.html", job=job, message=message,
                  message_kind=kind, final=FINAL, **HELPERS)


async def delivery_action(request: web.Request, action: str) -> web.StreamResponse:
    """Requeue or cancel from the detail page: HTMX swaps the live part of the page; a plain
    form is redirected back to the page (or shown the page with the reason it was refused)."""
    job_id, destination = request.match_info["job_id"], request.match_info["destination"]
    form = await request.post()
    reason = str(form.get("reason", ""))[:500]
    htmx = bool(request.headers.get("HX-Request"))
    try:
        await change_delivery(request, job_id, destination, action, reason)
    except ApiError as exc:
        if exc.status == 404:
            return render(request, "error.html", status=404, message=exc.message)
        if htmx:
            return await live_fragment(request, exc.message, "error")
        job = await load_job(request, job_id)
        return render(request, "job_detail.html", status=exc.status, job=job,
                      flash=exc.message, flash_kind="error", final=FINAL, **HELPERS)
    if htmx:
        return await live_fragment(request, DONE[action].format(destination))
    query = urlencode({"done": action, "destination": destination})
    raise web.HTTPSeeOther(f"/jobs/{job_id}?{query}")


async def requeue(request: web.Request) -> web.StreamResponse:
    return await delivery_action(request, "requeue")


async def cancel(request: web.Request) -> web.StreamResponse:
    return await delivery_action(request, "cancel")


async def live_poll(request: web.Request) -> web.Response:
    return await live_fragment(request)


ROUTES = [
    Route("GET", "/jobs/{job_id}", job_page, "jobs.read", "One job with its event timeline"),
    Route("GET", "/jobs/{job_id}/live", live_poll, "jobs.read",
          "A job's deliveries and timeline (HTMX fragment)"),
    Route("POST", "/jobs/{job_id}/deliveries/{destination}/requeue", requeue, "jobs.write",
          "Requeue a delivery"),
    Route("POST", "/jobs/{job_id}/deliveries/{destination}/cancel", cancel, "jobs.write",
          "Cancel a delivery"),
]
