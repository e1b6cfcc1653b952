"""The audit trail over the API: search with filters and paging, CSV/JSON export (streamed, same
filters), the history of one study, and rules, destinations and users as of a chosen time.

Every call is itself recorded in the access log (``audit.search``, ``audit.export``,
``audit.history``, ``audit.state``), after its query, so it never shows in its own result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from aiohttp import web

from projections import audit_queries as queries
from router.application.history import StateAsOf, state_as_of
from router.application.sessions import AccessRecord
from web.api.common import ApiError, json_response, paging
from web.auth import record_access
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

FILTER_PARAMS = ("user", "patient", "study", "action", "outcome", "from", "to")
EXPORT_FORMATS = {"csv": "text/csv", "json": "application/json"}
NO_STORE = {"Cache-Control": "no-store"}
EXPORT_PAGE = 1000


def audit_db(request: web.Request) -> Any:
    return request.app[ROUTER_KEY].view_db("audit")


def audit_filter(request: web.Request) -> queries.AuditFilter:
    try:
        return queries.AuditFilter.from_query(request.query)
    except queries.FilterError as exc:
        raise ApiError(422, "invalid filter", fields=exc.fields) from None


def state_time(request: web.Request) -> float:
    """``at`` (ISO 8601 UTC) or now."""
    value = request.query.get("at", "").strip()
    if not value:
        return time.time()
    try:
        return queries.parse_time(value, end_of_day=True)
    except ValueError:
        raise ApiError(422, "invalid time", fields={
            "at": "expected ISO 8601 UTC, e.g. 2024-01-15T09:30:00Z"}) from None


async def search(request: web.Request) -> web.Response:
    flt = audit_filter(request)
    limit, offset = paging(request)
    await fresh(request, "audit")
    rows, total = await asyncio.to_thread(queries.search, audit_db(request), flt, limit, offset)
    await record_access(request, AccessRecord(
        action="audit.search", object_type="audit", study_instance_uid=flt.study_uid,
        patient_id=flt.patient_id, detail=f"{flt.describe()} total={total}".strip()))
    return json_response({"total": total, "limit": limit, "offset": offset,
                          "items": [queries.public_row(r) for r in rows]}, headers=NO_STORE)


async def export(request: web.Request) -> web.StreamResponse:
    fmt = request.query.get("format", "csv")
    if fmt not in EXPORT_FORMATS:
        raise ApiError(422, "invalid format", fields={"format": "csv or json"})
    flt = audit_filter(request).up_to(time.time())
    await fresh(request, "audit")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    response = web.StreamResponse(headers={
        **NO_STORE, "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'attachment; filename="audit-{stamp}.{fmt}"'})
    response.content_type = EXPORT_FORMATS[fmt]
    response.charset = "utf-8"
    await response.prepare(request)
    progress = {"rows": 0}
    complete = False
    try:
        await stream_rows(response, audit_db(request), flt, fmt, progress)
        await response.write_eof()
        complete = True
    except ConnectionResetError:
        pass  # the client went away: recorded below as a failed export
    finally:
        await record_access(request, AccessRecord(
            action="audit.export", object_type="audit", study_instance_uid=flt.study_uid,
            patient_id=flt.patient_id, outcome="success" if complete else "failure",
            detail=f"format={fmt} rows={progress['rows']} {flt.describe()}".strip()))
    return response


async def stream_rows(response: web.StreamResponse, db: Any, flt: queries.AuditFilter,
                      fmt: str, progress: dict[str, int]) -> None:
    """Write the matching rows page by page, counting them in ``progress``."""
    after: tuple[Any, ...] | None = None
    await response.write((queries.csv_text([], header=True) if fmt == "csv" else "[\n")
                         .encode())
    while True:
        rows = await asyncio.to_thread(queries.export_page, db, flt, after, EXPORT_PAGE)
        if rows:
            chunk = (queries.csv_text(rows) if fmt == "csv"
                     else queries.json_items(rows, first=progress["rows"] == 0))
            await response.write(chunk.encode())
            progress["rows"] += len(rows)
            last = rows[-1]
            after = (last["occurred_at"], last["application"], last["position"])
        if len(rows) < EXPORT_PAGE:
            break
    if fmt == "json":
        await response.write(b"\n]\n")


async def history(request: web.Request) -> web.Response:
    study = request.query.get("study", "").strip()
    if not study or len(study) > queries.MAX_TEXT:
        raise ApiError(422, "invalid study", fields={"study": "a StudyInstanceUID is required"})
    limit, offset = paging(request, default=500)
    rows, total, summary = await asyncio.to_thread(queries.study_history, audit_db(request),
                                                   study, limit, offset)
    await record_access(request, AccessRecord(
        action="audit.history", object_type="study", object_id=study,
        study_instance_uid=study, patient_id=queries.patient_of(rows),
        detail=f"total={total}"))
    return json_response({
        "study_instance_uid": study, "total": total, "limit": limit, "offset": offset,
        "summary": [{"action": r["action"], "outcome": r["outcome"], "count": int(r["n"])}
                    for r in summary],
        "items": [queries.public_row(r) for r in rows]}, headers=NO_STORE)


async def state(request: web.Request) -> web.Response:
    at = state_time(request)
    router = request.app[ROUTER_KEY]
    result = await asyncio.to_thread(state_as_of, router.stores.admin, at)
    await record_access(request, AccessRecord(
        action="audit.state", object_type="admin_state", object_id=queries.iso(at),
        detail=f"at={queries.iso(at)} events={result.events}"))
    return json_response(state_document(result), headers=NO_STORE)


def state_document(result: StateAsOf) -> dict[str, Any]:
    """The state as JSON: times as ISO 8601 UTC."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (queries.iso(v) if k == "at" else convert(v)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    document: dict[str, Any] = convert(dataclasses.asdict(result))
    return document


ROUTES = [
    Route("GET", "/api/v1/audit", search, "audit.read",
          "Search the audit trail (newest first) with filters and paging",
          query=(*FILTER_PARAMS, "limit", "offset"), tags=("audit",)),
    Route("GET", "/api/v1/audit/export", export, "audit.read",
          "Export the matching audit rows (oldest first) as CSV or JSON, streamed",
          query=(*FILTER_PARAMS, "format"), tags=("audit",)),
    Route("GET", "/api/v1/audit/history", history, "audit.read",
          "Every receipt, routing decision, delivery attempt and access of one study",
          query=("study", "limit", "offset"), tags=("audit",)),
    Route("GET", "/api/v1/audit/state", state, "audit.read",
          "Rules, destinations and users as they were at a time (secrets masked)",
          query=("at",), tags=("audit",)),
]
