"""Bulk actions under ``/api/v1/deliveries``: requeue or cancel every delivery matching a
filter (destination, status, time range, study), as the caller and with a reason; the jobs
page's bulk form uses the same functions. Batches run in a thread, one at a time, so ten
thousand deliveries never hold the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.application.bulk import (
    BulkDeliveries,
    BulkFilterError,
    BulkRun,
    DeliveryFilter,
    parse_instant,
)
from router.application.commands import Actor
from web.api.common import ApiError, json_response, read_json
from web.auth import actor_of
from web.filters import UID_RE
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

TAGS = ("jobs",)
CHANGE_WAIT_S = 5.0
# The names people see (router/domain/delivery_states.py) and their old aliases.
Status = Literal["queued", "held", "retrying", "failed", "delivered", "cancelled",
                 "pending", "dead", "dead-lettered"]


class BulkRequest(BaseModel):
    """Which deliveries (every given criterion must match) and why."""

    model_config = ConfigDict(extra="forbid")
    destination: str | None = Field(None, min_length=1, max_length=64)
    status: Status | None = Field(None, description="requeue: retrying, failed or cancelled "
                                  "(default: all three); cancel: queued, retrying or failed "
                                  "(old names: pending, dead, dead-lettered)")
    since: str | None = Field(None, max_length=40, description="received at or after: "
                              "YYYY-MM-DD or ISO 8601 (UTC unless it says)")
    until: str | None = Field(None, max_length=40, description="received before (a date: "
                              "up to the end of that day)")
    study_uid: str | None = Field(None, max_length=64)
    all: bool = Field(False, description="required to act with no other criterion")
    reason: str = Field("", max_length=500)
    dry_run: bool = Field(False, description="only count; records nothing")


def bulk_of(router: RouterPort) -> BulkDeliveries:
    return BulkDeliveries(router.commands, router.stores, router.view_db("jobs"))


def delivery_filter(router: RouterPort, values: BulkRequest) -> DeliveryFilter:
    """The filter of a request; BulkFilterError names a bad field."""
    if values.study_uid is not None and not UID_RE.match(values.study_uid):
        raise BulkFilterError("study_uid", "a DICOM UID is digits and dots, at most 64 "
                              "characters")
    if values.destination is not None and values.destination not in (
            router.admin.snapshot().destinations):
        raise BulkFilterError("destination", f"no destination named {values.destination!r}")
    return DeliveryFilter(
        destination=values.destination, status=values.status,
        since=parse_instant(values.since, "since") if values.since else None,
        until=parse_instant(values.until, "until", end_of_day=True) if values.until else None,
        study_uid=values.study_uid, everything=values.all,
        given={"destination": values.destination, "status": values.status,
               "since": values.since, "until": values.until, "study_uid": values.study_uid})


async def bulk_action(request: web.Request, operation: str, values: BulkRequest,
                      actor: Actor) -> dict[str, Any]:
    """Count (dry run) or carry out a bulk action; 422 ApiError naming the field."""
    router = request.app[ROUTER_KEY]
    bulk = bulk_of(router)
    await fresh(request, "jobs")
    try:
        flt = await asyncio.to_thread(delivery_filter, router, values)
        if values.dry_run:
            matched = await asyncio.to_thread(bulk.count, flt, operation)
            return {"operation": operation, "dry_run": True, "matched": matched}
        run: BulkRun = await asyncio.to_thread(bulk.start, flt, operation, values.reason,
                                               actor)
    except BulkFilterError as exc:
        raise ApiError(422, str(exc), fields={exc.field: exc.message}) from None
    while await asyncio.to_thread(bulk.next_batch, run):
        pass  # one batch per thread hop: the event loop serves others in between
    await fresh(request, "jobs", timeout=CHANGE_WAIT_S)
    return {"operation": operation, "dry_run": False, "matched": run.matched,
            "affected": run.affected, "skipped": run.skipped,
            "correlation_id": run.actor.correlation_id}


async def requeue(request: web.Request) -> web.Response:
    body = await read_json(request, BulkRequest)
    return json_response(await bulk_action(request, "requeue", body, actor_of(request)))


async def cancel(request: web.Request) -> web.Response:
    body = await read_json(request, BulkRequest)
    return json_response(await bulk_action(request, "cancel", body, actor_of(request)))


ROUTES = [
    Route("POST", "/api/v1/deliveries/requeue", requeue, "jobs.write",
          "Requeue every delivery matching the filter (retrying, failed or cancelled ones);"
          " answers how many matched and were requeued. An empty filter needs \"all\": true",
          body=BulkRequest, tags=TAGS),
    Route("POST", "/api/v1/deliveries/cancel", cancel, "jobs.write",
          "Cancel every delivery matching the filter (queued, retrying or failed ones);"
          " answers how many matched and were cancelled. An empty filter needs \"all\": true",
          body=BulkRequest, tags=TAGS),
]
