"""The patient access report over the API (``GET /api/v1/audit/access-report``) and the read
it shares with the pages: query the audit view, then record the read as an access to the
patient's data (``audit.access_report`` or ``audit.access_report_export``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from projections import access_report_queries as queries
from projections.audit_queries import AuditFilter, FilterError, iso
from router.application.sessions import AccessRecord
from web.api.audit import NO_STORE, audit_db
from web.api.common import ApiError, json_response
from web.auth import record_access
from web.freshness import fresh
from web.routes import Route

PARAMS = ("patient", "from", "to")


def period(query: Any) -> tuple[str | None, float, float]:
    """Patient, from and to of a query string (from: the beginning, to: now when absent);
    FilterError naming the field that is wrong."""
    flt = AuditFilter.from_query({key: query.get(key, "") for key in PARAMS})
    return flt.patient_id, flt.since or 0.0, flt.until or time.time()


async def read_report(request: web.Request, patient: str, since: float, until: float,
                      action: str, detail: str) -> queries.Report:
    """The report, then its access record (after the query: it never lists itself)."""
    await fresh(request, "audit")
    rep = await asyncio.to_thread(queries.report, audit_db(request), patient, since, until)
    await record_access(request, AccessRecord(
        action=action, object_type="patient", object_id=patient[:64], patient_id=patient,
        detail=(f"{detail} from={iso(since)} to={iso(until)} accesses={len(rep.accesses)}"
                f" rows={rep.rows_read}").strip()))
    return rep


def public(access: queries.Access) -> dict[str, Any]:
    return {"first_time": iso(access.first), "last_time": iso(access.last),
            "user": access.actor, "role": access.role,
            "client_ips": [access.source_ip, *sorted(access.other_ips)], "what": access.kind,
            "actions": dict(access.actions.most_common()), "count": access.count,
            "study_instance_uid": access.study_uid or None, "outcome": access.outcome}


async def access_report(request: web.Request) -> web.Response:
    try:
        patient, since, until = period(request.query)
    except FilterError as exc:
        raise ApiError(422, "invalid report parameters", fields=exc.fields) from None
    if not patient:
        raise ApiError(422, "invalid report parameters",
                       fields={"patient": "give the Patient ID"})
    rep = await read_report(request, patient, since, until, "audit.access_report",
                            "format=json")
    return json_response({"patient_id": patient, "from": iso(since), "to": iso(until),
                          "rows_read": rep.rows_read, "truncated": rep.cut,
                          "accesses": [public(a) for a in rep.accesses]}, headers=NO_STORE)


ROUTES = [
    Route("GET", "/api/v1/audit/access-report", access_report, "audit.read",
          "Who accessed one patient's data in a period: one row per access, a viewer"
          " session's reads folded into one row with a count",
          query=PARAMS, tags=("audit",)),
]
