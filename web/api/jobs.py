"""Jobs under ``/api/v1/jobs``: a filtered, paged list; one job with its deliveries and its
whole event history; requeue and cancel a delivery (through the write side, as the caller).
Listing and viewing jobs shows PHI, so each call is recorded in the access log.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from projections.jobs import JobsView
from projections.jobs_queries import (
    FILTER_FIELDS,
    JobFilters,
    get_delivery,
    get_job,
    job_events,
    list_jobs,
)
from projections.positions import view_positions
from router.application.sessions import AccessRecord
from web.api.common import ApiError, json_response, paging, read_json, run_command
from web.auth import actor_of, record_access
from web.filters import FilterError, job_filters, with_iso_times
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

TAGS = ("jobs",)
TIMELINE_WAIT_S = 2.0
CHANGE_WAIT_S = 5.0  # a requeue or cancel answers once the jobs view shows it


class CancelRequest(BaseModel):
    reason: str = Field(default="", max_length=500)


class RequeueRequest(CancelRequest):
    """Why the delivery is requeued (optional; recorded with Delivery.Requeued)."""


def filters_or_400(query: Any, strict: bool = True) -> JobFilters:
    try:
        return job_filters(query, strict)
    except FilterError as exc:
        raise ApiError(400, str(exc), fields={exc.field: exc.message}) from None


def list_record(filters: JobFilters, total: int) -> AccessRecord:
    used = ", ".join(filters.used()) or "none"
    return AccessRecord(action="jobs.list", object_type="job",
                        study_instance_uid=filters.study_uid, patient_id=filters.patient_id,
                        detail=f"filters: {used}; matched: {total}")


def view_record(job_id: str, job: dict[str, Any] | None) -> AccessRecord:
    if job is None:
        return AccessRecord(action="job.view", object_type="job", object_id=job_id[:64],
                            outcome="not_found")
    return AccessRecord(action="job.view", object_type="job", object_id=job["job_id"],
                        study_instance_uid=job["study_instance_uid"],
                        patient_id=job["patient_id"])


async def load_job(request: web.Request, job_id: str) -> dict[str, Any] | None:
    """The job with its deliveries and timeline (views only), or None."""
    router = request.app[ROUTER_KEY]
    jobs_db, audit_db = router.view_db("jobs"), router.view_db("audit")
    await fresh(request, "jobs")
    job = await asyncio.to_thread(get_job, jobs_db, job_id)
    if job is not None:
        job["timeline_complete"] = await audit_in_step(router)
        job["events"] = await asyncio.to_thread(job_events, audit_db, job)
    return job


async def audit_in_step(router: RouterPort, timeout: float = TIMELINE_WAIT_S) -> bool:
    """Wait until the audit view has applied the ingest and delivery logs as far as the jobs
    view had when asked: a job's timeline (audit view) then holds every event behind the
    status shown beside it (jobs view). Each view has its own thread and batches, so the
    audit view may trail by a batch; False when it is still behind after ``timeout``."""
    done = await asyncio.to_thread(view_positions, router.view_db("jobs"), "jobs")
    target = {log: done.get(log, 0) for log in JobsView.follows}
    progress = router.runner.progress
    if progress.reached("audit", target):
        return True
    router.runner.hurry("audit")
    return bool(await progress.wait_async("audit", target, timeout))


async def jobs_list(request: web.Request) -> web.Response:
    filters = filters_or_400(request.query)
    limit, offset = paging(request)
    router = request.app[ROUTER_KEY]
    await fresh(request, "jobs")
    rows, total = await asyncio.to_thread(list_jobs, router.view_db("jobs"), filters, limit,
                                          offset)
    await record_access(request, list_record(filters, total))
    return json_response({"total": total, "limit": limit, "offset": offset,
                          "items": with_iso_times(rows)})


async def job_detail(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = await load_job(request, job_id)
    await record_access(request, view_record(job_id, job))
    if job is None:
        raise ApiError(404, "no job with this id")
    for delivery in job["deliveries"]:
        delivery.pop("job_id", None)
    return json_response(with_iso_times(job))


async def change_delivery(request: web.Request, job_id: str, destination: str, action: str,
                          reason: str = "") -> dict[str, Any]:
    """Requeue or cancel one delivery of a job as the caller; answers the delivery as the
    jobs view shows it once the view has applied the change. 404 / 422 as ApiError."""
    router = request.app[ROUTER_KEY]
    jobs_db = router.view_db("jobs")
    await fresh(request, "jobs")
    job = await asyncio.to_thread(get_job, jobs_db, job_id)
    if job is None:
        raise ApiError(404, "no job with this id")
    if not any(d["destination"] == destination for d in job["deliveries"]):
        raise ApiError(404, f"this job has no delivery to {destination!r}")
    actor = actor_of(request)
    if action == "requeue":
        await run_command(router.commands.requeue, job["job_id"], destination, actor, reason)
    else:
        await run_command(router.commands.cancel, job["job_id"], destination, actor, reason)
    await fresh(request, "jobs", timeout=CHANGE_WAIT_S)
    delivery = await asyncio.to_thread(get_delivery, jobs_db, job["job_id"], destination)
    return delivery or {}


async def requeue(request: web.Request) -> web.Response:
    body = RequeueRequest()
    if request.can_read_body:
        body = await read_json(request, RequeueRequest)
    delivery = await change_delivery(request, request.match_info["job_id"],
                                     request.match_info["destination"], "requeue", body.reason)
    return json_response({"requeued": True, "delivery": with_iso_times(delivery)})


async def cancel(request: web.Request) -> web.Response:
    body = CancelRequest()
    if request.can_read_body:
        body = await read_json(request, CancelRequest)
    delivery = await change_delivery(request, request.match_info["job_id"],
                                     request.match_info["destination"], "cancel", body.reason)
    return json_response({"cancelled": True, "delivery": with_iso_times(delivery)})


DELIVERY = "/api/v1/jobs/{job_id}/deliveries/{destination}"
ROUTES = [
    Route("GET", "/api/v1/jobs", jobs_list, "jobs.read",
          "Jobs (one per received instance), newest first, filtered and paged; status is the"
          " most urgent delivery state (failed, retrying, queued, held, delivered, cancelled;"
          " or received, unrouted, duplicate, conflict when nothing was routed). status also"
          " takes the old names dead, dead-lettered (failed) and pending (queued). Grouped by"
          " study and sender: /api/v1/transfers",
          query=(*FILTER_FIELDS, "limit", "offset"), tags=TAGS),
    Route("GET", "/api/v1/jobs/{job_id}", job_detail, "jobs.read",
          "One job: receipt, routing, deliveries and its whole event history"
          " (timeline_complete is false when the audit trail had not yet caught up with"
          " the delivery status after 2 s)", tags=TAGS),
    Route("POST", DELIVERY + "/requeue", requeue, "jobs.write",
          "Attempt this delivery again now (optional reason, recorded)", body=RequeueRequest,
          body_optional=True, tags=TAGS),
    Route("POST", DELIVERY + "/cancel", cancel, "jobs.write",
          "Stop this delivery (no more attempts unless requeued; optional reason)",
          body=CancelRequest, body_optional=True, tags=TAGS),
]
