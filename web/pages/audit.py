"""The audit trail pages: search with filters, paging and export links (``/audit``), the
history of one study (``/audit/history?study=UID``) and the configuration as of a time
(``/audit/state?at=...``). Every view is recorded as an access after its query.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from aiohttp import web

from projections import audit_queries as queries
from router.application.history import state_as_of
from router.application.sessions import AccessRecord
from router.application.versions import compare, history
from web.api.audit import audit_db
from web.api.common import MAX_LIMIT
from web.auth import record_access
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.pages.audit_actions import choices_with
from web.pages.audit_rows import changes, present
from web.render import render
from web.routes import Route

PAGE_SIZE = 50
FORM_FIELDS = ("user", "patient", "study", "action", "outcome", "from", "to")
HISTORY_PAGE_SIZE = 500
# Rule keys shown in their own columns; the others are the rule's criteria.
RULE_COLUMNS = ("name", "priority", "enabled", "destinations", "stop", "description")


def _admin(request: web.Request) -> Any:
    return request.app[ROUTER_KEY].stores.admin


def _page_args(request: web.Request, default: int) -> tuple[int, int]:
    """limit and offset from the query string; bad values fall back to the first page."""
    try:
        limit = min(MAX_LIMIT, max(1, int(request.query.get("limit", default))))
        offset = max(0, int(request.query.get("offset", 0)))
    except ValueError:
        return default, 0
    return limit, offset


def local_value(ts: float | None) -> str:
    """A time for an ``<input type="datetime-local">`` (UTC, seconds)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def pager(path: str, params: dict[str, str], limit: int, offset: int,
          total: int) -> dict[str, Any]:
    def link(at: int) -> str:
        return path + "?" + urlencode({**params, "limit": limit, "offset": at})

    return {"first": offset + 1 if total else 0, "last": min(offset + limit, total),
            "total": total,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "next": link(offset + limit) if offset + limit < total else None}


async def audit_page(request: web.Request) -> web.Response:
    try:
        flt = queries.AuditFilter.from_query(request.query)
    except queries.FilterError as exc:
        form = {key: request.query.get(key, "") for key in FORM_FIELDS}
        return render(request, "audit.html", status=400, errors=exc.fields, rows=[],
                      form=form, page=None, export={},
                      actions=choices_with(request.query.get("action")),
                      outcomes=queries.OUTCOMES, hide_study=False,
                      flash="Please correct the filter.", flash_kind="error")
    limit, offset = _page_args(request, PAGE_SIZE)
    await fresh(request, "audit")
    rows, total = await asyncio.to_thread(queries.search, audit_db(request), flt, limit, offset)
    changed = await asyncio.to_thread(changes, _admin(request), rows)
    await record_access(request, AccessRecord(
        action="audit.search", object_type="audit", study_instance_uid=flt.study_uid,
        patient_id=flt.patient_id, detail=f"{flt.describe()} total={total}".strip()))
    params = flt.query_params()
    form = {**dict.fromkeys(FORM_FIELDS, ""), **params, "from": local_value(flt.since),
            "to": local_value(flt.until)}
    values: dict[str, Any] = {
        "rows": present(rows, changed), "form": form, "errors": {}, "hide_study": False,
        "page": pager("/audit", params, limit, offset, total),
        "export": {fmt: "/api/v1/audit/export?" + urlencode({**params, "format": fmt})
                   for fmt in ("csv", "json")},
        "actions": choices_with(flt.action), "outcomes": queries.OUTCOMES}
    if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "audit-results":
        return render(request, "_audit_results.html", **values)
    return render(request, "audit.html", **values)


async def history_page(request: web.Request) -> web.Response:
    study = request.query.get("study", "").strip()
    if not study or len(study) > queries.MAX_TEXT:
        return render(request, "audit_history.html", status=400, study=study, rows=[],
                      summary=[], page=None, patient_id=None, hide_study=True,
                      flash="Give a StudyInstanceUID.", flash_kind="error")
    limit, offset = _page_args(request, HISTORY_PAGE_SIZE)
    await fresh(request, "audit")
    rows, total, summary = await asyncio.to_thread(queries.study_history, audit_db(request),
                                                   study, limit, offset)
    changed = await asyncio.to_thread(changes, _admin(request), rows)
    await record_access(request, AccessRecord(
        action="audit.history", object_type="study", object_id=study,
        study_instance_uid=study, patient_id=queries.patient_of(rows),
        detail=f"total={total}"))
    return render(request, "audit_history.html", study=study, rows=present(rows, changed),
                  hide_study=True,
                  summary=summary, patient_id=queries.patient_of(rows),
                  page=pager("/audit/history", {"study": study}, limit, offset, total))


def rule_criteria(spec: dict[str, Any]) -> str:
    """What a rule matches, as ``key=value`` pairs (empty criteria left out)."""
    parts = [f"{key}={json.dumps(value, sort_keys=True)}" for key, value in spec.items()
             if key not in RULE_COLUMNS and value not in (None, "", [], {})]
    return ", ".join(parts) or "anything"


async def state_page(request: web.Request) -> web.Response:
    value = request.query.get("at", "").strip()
    try:
        at = queries.parse_time(value, end_of_day=True) if value else time.time()
    except ValueError:
        return render(request, "audit_state.html", status=400, state=None, at_value=value,
                      at_iso="", api="", flash="Expected a time such as 2024-01-15T09:30:00 (UTC).",
                      flash_kind="error", criteria=rule_criteria, iso=queries.iso)
    router = request.app[ROUTER_KEY]
    result = await asyncio.to_thread(state_as_of, router.stores.admin, at)
    await record_access(request, AccessRecord(
        action="audit.state", object_type="admin_state", object_id=queries.iso(at),
        detail=f"at={queries.iso(at)} events={result.events}"))
    return render(request, "audit_state.html", state=result, at_value=local_value(at),
                  at_iso=queries.iso(at), criteria=rule_criteria, iso=queries.iso,
                  api="/api/v1/audit/state?" + urlencode({"at": queries.iso(at)}))


def _version(request: web.Request, key: str, versions: list[Any], default: int) -> Any:
    """The version ``key`` names (a number in the history), else the ``default`` one."""
    numbers = {v.version: v for v in versions}
    try:
        return numbers.get(int(request.query.get(key, default)), numbers.get(default))
    except ValueError:
        return numbers.get(default)


async def versions_page(request: web.Request) -> web.Response:
    """Two versions of a rule, destination, user or remote node side by side."""
    value = request.query.get("object", "").strip()
    try:
        oid = UUID(value)
    except ValueError:
        return render(request, "audit_versions.html", status=400, versions=[], object_id=value,
                      flash="object: give the id of a rule, destination, user or remote node"
                            " (the Object column of the audit trail).", flash_kind="error")
    versions = await asyncio.to_thread(history, _admin(request), oid)
    await record_access(request, AccessRecord(
        action="audit.versions", object_type=versions[0].kind if versions else "unknown",
        object_id=str(oid), detail=f"versions={len(versions)}"))
    if not versions:
        return render(request, "audit_versions.html", status=404, versions=[], object_id=value,
                      flash="No rule, destination, user or remote node has this id.",
                      flash_kind="error")
    latest = versions[-1].version
    b = _version(request, "b", versions, latest)
    a = _version(request, "a", versions, max(1, b.version - 1))
    return render(request, "audit_versions.html", versions=versions, object_id=str(oid),
                  a=a, b=b, rows=compare(a, b), iso=queries.iso)


ROUTES = [
    Route("GET", "/audit", audit_page, "audit.read", "Audit trail"),
    Route("GET", "/audit/history", history_page, "audit.read", "History of one study"),
    Route("GET", "/audit/state", state_page, "audit.read",
          "Rules, destinations and users as of a time"),
    Route("GET", "/audit/versions", versions_page, "audit.read",
          "Two versions of a rule, destination, user or remote node side by side"),
]
