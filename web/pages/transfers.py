"""The jobs page as people use it: ``/jobs`` lists transfers (one row per study and sender,
with per-destination progress), each expandable (HTMX) into its series and a series into its
instances. ``/jobs?view=instances`` is the per-instance list (web/pages/jobs.py), with the
same filters. Every list and expansion shows PHI, so each is recorded as an access.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.jobs_queries import JOB_STATUSES
from projections.transfers_queries import (
    FILTER_FIELDS,
    get_transfer,
    list_transfers,
    series_instances,
)
from web.api.transfers import list_record, view_record
from web.auth import record_access
from web.filters import UID_RE, FilterError, transfer_filters
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.pages.jobs import HELPERS, instances_page, page_window, pager
from web.render import render
from web.routes import Route


async def jobs_page(request: web.Request) -> web.Response:
    if request.query.get("view") == "instances":
        return await instances_page(request)
    return await transfers_page(request)


async def transfers_page(request: web.Request) -> web.Response:
    query = request.query
    values: dict[str, Any] = {"form": {f: query.get(f, "") for f in FILTER_FIELDS},
                              "statuses": JOB_STATUSES, "transfers": [], "pager": None,
                              **HELPERS}
    router = request.app[ROUTER_KEY]
    values["destination_names"] = await asyncio.to_thread(
        lambda: sorted(router.admin.snapshot().destinations))
    try:
        filters = transfer_filters(query, strict=False)
        limit, offset = page_window(query)
    except FilterError as exc:
        return render(request, "transfers.html", status=400, flash=str(exc),
                      flash_kind="error", **values)
    await fresh(request, "jobs")
    rows, total = await asyncio.to_thread(list_transfers, router.view_db("jobs"), filters,
                                          limit, offset)
    await record_access(request, list_record(filters, total))
    values.update(transfers=rows, pager=pager("/jobs", query, limit, offset, len(rows), total))
    return render(request, "transfers.html", **values)


async def series_fragment(request: web.Request) -> web.Response:
    """A transfer's series (HTMX fragment of the transfers table)."""
    transfer_id = request.match_info["transfer_id"]
    router = request.app[ROUTER_KEY]
    await fresh(request, "jobs")
    transfer = await asyncio.to_thread(get_transfer, router.view_db("jobs"), transfer_id)
    await record_access(request, view_record(transfer_id, transfer))
    if transfer is None:
        return render(request, "error.html", status=404, message="No transfer with this id.")
    return render(request, "_transfer_series.html", transfer=transfer, **HELPERS)


async def instances_fragment(request: web.Request) -> web.Response:
    """The instances of one series of a transfer (HTMX fragment)."""
    transfer_id = request.match_info["transfer_id"]
    series_uid = request.match_info["series_uid"]
    router = request.app[ROUTER_KEY]
    jobs_db = router.view_db("jobs")
    await fresh(request, "jobs")
    transfer = None
    if UID_RE.match(series_uid):
        transfer = await asyncio.to_thread(get_transfer, jobs_db, transfer_id, False)
    await record_access(request, view_record(transfer_id, transfer))
    if transfer is None:
        return render(request, "error.html", status=404,
                      message="No transfer with this id and series.")
    rows, truncated = await asyncio.to_thread(series_instances, jobs_db, transfer_id,
                                              series_uid)
    return render(request, "_transfer_instances.html", transfer=transfer, instances=rows,
                  truncated=truncated, series_uid=series_uid, **HELPERS)


ROUTES = [
    Route("GET", "/jobs", jobs_page, "jobs.read",
          "Jobs by transfer (study and sender) with progress; ?view=instances: per instance"),
    Route("GET", "/transfers/{transfer_id}/series", series_fragment, "jobs.read",
          "A transfer's series with progress (HTMX fragment)"),
    Route("GET", "/transfers/{transfer_id}/series/{series_uid}/instances", instances_fragment,
          "jobs.read", "The instances of one series of a transfer (HTMX fragment)"),
]
