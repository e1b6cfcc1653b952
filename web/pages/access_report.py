"""The patient access report pages: pick a patient (``/audit/access?q=...`` lists matching
patients), read who accessed their data in a period (``/audit/access?patient=ID``), as CSV
(``/audit/access.csv``) or as a print view (``/audit/access/print``). Each read and export
is recorded as an access after its query (``audit.access_report``,
``audit.access_report_export``); so is the patient search (``audit.patient_search``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from projections import access_report_queries as queries
from projections.audit_queries import MAX_TEXT, FilterError, iso
from router.application.sessions import AccessRecord
from web.api.access_report import period, read_report
from web.auth import record_access
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route


def _studies_db(request: web.Request) -> Any:
    return request.app[ROUTER_KEY].view_db("studies")


def _form(request: web.Request) -> dict[str, str]:
    return {key: request.query.get(key, "").strip() for key in ("q", "patient", "from", "to")}


def _links(patient: str, form: dict[str, str]) -> dict[str, str]:
    params = urlencode({"patient": patient, "from": form["from"], "to": form["to"]})
    return {"csv": "/audit/access.csv?" + params, "print": "/audit/access/print?" + params,
            "trail": "/audit?" + urlencode({"patient": patient})}


def _rows(rep: queries.Report) -> list[dict[str, Any]]:
    return [{"first": iso(a.first), "last": iso(a.last) if a.last != a.first else "",
             "actor": a.actor, "role": a.role, "ip": a.source_ip,
             "other_ips": sorted(a.other_ips), "kind": a.kind, "actions": a.actions_text(),
             "count": a.count, "study": a.study_uid, "outcome": a.outcome}
            for a in rep.accesses]


async def _patients(request: web.Request, term: str) -> list[dict[str, Any]]:
    await fresh(request, "studies")
    found = await asyncio.to_thread(queries.matching_patients, _studies_db(request), term)
    await record_access(request, AccessRecord(
        action="audit.patient_search", object_type="patient",
        detail=f"matches={len(found)}"))
    return found


async def _name_of(request: web.Request, patient: str) -> str:
    return await asyncio.to_thread(queries.patient_name, _studies_db(request), patient)


async def report_page(request: web.Request) -> web.Response:
    form = _form(request)
    values: dict[str, Any] = {"form": form, "errors": {}, "patients": None, "report": None}
    try:
        patient, since, until = period(request.query)
    except FilterError as exc:
        return render(request, "access_report.html", status=400, **{**values,
                      "errors": exc.fields}, flash="Please correct the form.",
                      flash_kind="error")
    if len(form["q"]) > MAX_TEXT:
        return render(request, "access_report.html", status=400, **{**values, "errors": {
            "q": f"at most {MAX_TEXT} characters"}}, flash="Please correct the form.",
            flash_kind="error")
    if form["q"] and not patient:
        values["patients"] = await _patients(request, form["q"])
    if patient:
        rep = await read_report(request, patient, since, until, "audit.access_report", "")
        values.update(report=rep, rows=_rows(rep), links=_links(patient, form),
                      patient_name=await _name_of(request, patient),
                      since=iso(since) if since else "", until=iso(until))
    return render(request, "access_report.html", **values)


async def print_page(request: web.Request) -> web.Response:
    patient, since, until = _required(request)
    rep = await read_report(request, patient, since, until, "audit.access_report", "view=print")
    return render(request, "access_report_print.html", report=rep, rows=_rows(rep),
                  patient_name=await _name_of(request, patient),
                  since=iso(since) if since else "",
                  until=iso(until), printed=iso(time.time()))


async def export_csv(request: web.Request) -> web.Response:
    patient, since, until = _required(request)
    rep = await read_report(request, patient, since, until, "audit.access_report_export",
                      "format=csv")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return web.Response(text=queries.csv_text(rep), content_type="text/csv", charset="utf-8",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 "Content-Disposition":
                                     f'attachment; filename="access-report-{stamp}.csv"'})


def _required(request: web.Request) -> tuple[str, float, float]:
    """Patient and period of an export; 400 naming the field when one is missing or wrong."""
    try:
        patient, since, until = period(request.query)
    except FilterError as exc:
        raise web.HTTPBadRequest(text="; ".join(f"{k}: {v}" for k, v in exc.fields.items()),
                                 content_type="text/plain") from None
    if not patient:
        raise web.HTTPBadRequest(text="patient: give the Patient ID", content_type="text/plain")
    return patient, since, until


ROUTES = [
    Route("GET", "/audit/access", report_page, "audit.read", "Patient access report"),
    Route("GET", "/audit/access.csv", export_csv, "audit.read", "Patient access report, CSV"),
    Route("GET", "/audit/access/print", print_page, "audit.read",
          "Patient access report, print view"),
]
