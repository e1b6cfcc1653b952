"""Studies under ``/api/v1/studies``: search by patient, date, modality, accession number and
description (paged); one study with its series, instances and where its instances were
delivered. Both show PHI, so each call is recorded in the access log.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.studies_queries import (
    FILTER_FIELDS,
    StudyFilters,
    delivery_status,
    get_study,
    search_studies,
)
from router.application.sessions import AccessRecord
from web.api.common import ApiError, json_response, paging
from web.auth import record_access
from web.filters import UID_RE, FilterError, study_filters, with_iso_times
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

TAGS = ("studies",)


def filters_or_400(query: Any, strict: bool = True) -> StudyFilters:
    try:
        return study_filters(query, strict)
    except FilterError as exc:
        raise ApiError(400, str(exc), fields={exc.field: exc.message}) from None


def search_record(filters: StudyFilters, total: int) -> AccessRecord:
    used = ", ".join(filters.used()) or "none"
    return AccessRecord(action="studies.search", object_type="study",
                        study_instance_uid=filters.study_uid, patient_id=filters.patient_id,
                        detail=f"filters: {used}; matched: {total}")


def view_record(study_uid: str, study: dict[str, Any] | None) -> AccessRecord:
    if study is None:
        return AccessRecord(action="study.view", object_type="study",
                            object_id=study_uid[:64], outcome="not_found")
    uid = study["study_instance_uid"]
    return AccessRecord(action="study.view", object_type="study", object_id=uid,
                        study_instance_uid=uid, patient_id=study["patient_id"])


async def load_study(request: web.Request, study_uid: str) -> dict[str, Any] | None:
    """The study with series, instances and delivery status (views only), or None."""
    if not UID_RE.match(study_uid):
        return None
    router = request.app[ROUTER_KEY]
    await fresh(request, "studies", "jobs")
    study = await asyncio.to_thread(get_study, router.view_db("studies"), study_uid)
    if study is None:
        return None
    summary, per_instance = await asyncio.to_thread(delivery_status, router.view_db("jobs"),
                                                    study_uid)
    study["deliveries"] = summary
    for instance in study["instances"]:
        instance["deliveries"] = per_instance.get(instance["sop_instance_uid"], {})
    return study


async def studies_search(request: web.Request) -> web.Response:
    filters = filters_or_400(request.query)
    limit, offset = paging(request)
    router = request.app[ROUTER_KEY]
    await fresh(request, "studies")
    rows, total = await asyncio.to_thread(search_studies, router.view_db("studies"), filters,
                                          limit, offset)
    await record_access(request, search_record(filters, total))
    return json_response({"total": total, "limit": limit, "offset": offset,
                          "items": with_iso_times(rows)})


async def study_detail(request: web.Request) -> web.Response:
    study_uid = request.match_info["study_uid"]
    study = await load_study(request, study_uid)
    await record_access(request, view_record(study_uid, study))
    if study is None:
        raise ApiError(404, "no study with this Study Instance UID")
    return json_response(with_iso_times(study))


ROUTES = [
    Route("GET", "/api/v1/studies", studies_search, "studies.read",
          "Search studies (patient_name, patient_id, accession_number and description take"
          " * and ? wildcards; dates YYYY-MM-DD or YYYYMMDD)",
          query=(*FILTER_FIELDS, "limit", "offset"), tags=TAGS),
    Route("GET", "/api/v1/studies/{study_uid}", study_detail, "studies.read",
          "One study: series, instances and per-destination delivery status", tags=TAGS),
]
