"""Transfers under ``/api/v1/transfers``: the instances of one study sent by one calling AE
title, with per-destination progress; a filtered, paged list and one transfer with its series.
Both show PHI (patient name and ID), so each call is recorded in the access log.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.transfers_queries import (
    FILTER_FIELDS,
    TransferFilters,
    get_transfer,
    list_transfers,
)
from router.application.sessions import AccessRecord
from web.api.common import ApiError, json_response, paging
from web.auth import record_access
from web.filters import FilterError, transfer_filters, with_iso_times
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

TAGS = ("transfers",)


def filters_or_400(query: Any, strict: bool = True) -> TransferFilters:
    try:
        return transfer_filters(query, strict)
    except FilterError as exc:
        raise ApiError(400, str(exc), fields={exc.field: exc.message}) from None


def list_record(filters: TransferFilters, total: int) -> AccessRecord:
    used = ", ".join(filters.used()) or "none"
    return AccessRecord(action="transfers.list", object_type="transfer",
                        study_instance_uid=filters.study_uid, patient_id=filters.patient_id,
                        detail=f"filters: {used}; matched: {total}")


def view_record(transfer_id: str, transfer: dict[str, Any] | None) -> AccessRecord:
    if transfer is None:
        return AccessRecord(action="transfer.view", object_type="transfer",
                            object_id=transfer_id[:64], outcome="not_found")
    return AccessRecord(action="transfer.view", object_type="transfer",
                        object_id=transfer["transfer_id"],
                        study_instance_uid=transfer["study_instance_uid"],
                        patient_id=transfer["patient_id"])


async def load_transfer(request: web.Request, transfer_id: str) -> dict[str, Any] | None:
    router = request.app[ROUTER_KEY]
    await fresh(request, "jobs")
    return await asyncio.to_thread(get_transfer, router.view_db("jobs"), transfer_id)


async def transfers_list(request: web.Request) -> web.Response:
    filters = filters_or_400(request.query)
    limit, offset = paging(request)
    router = request.app[ROUTER_KEY]
    await fresh(request, "jobs")
    rows, total = await asyncio.to_thread(list_transfers, router.view_db("jobs"), filters,
                                          limit, offset)
    await record_access(request, list_record(filters, total))
    return json_response({"total": total, "limit": limit, "offset": offset,
                          "items": with_iso_times(rows)})


async def transfer_detail(request: web.Request) -> web.Response:
    transfer_id = request.match_info["transfer_id"]
    transfer = await load_transfer(request, transfer_id)
    await record_access(request, view_record(transfer_id, transfer))
    if transfer is None:
        raise ApiError(404, "no transfer with this id")
    return json_response(with_iso_times(transfer))


ROUTES = [
    Route("GET", "/api/v1/transfers", transfers_list, "jobs.read",
          "Transfers (the instances of one study sent by one calling AE title), latest"
          " receipt first, filtered and paged, each with instance and series counts, its"
          " status (the most urgent delivery state: failed, retrying, queued, held, delivered,"
          " cancelled; or received / unrouted when nothing was routed) and per-destination"
          " progress. status also takes the old names dead, dead-lettered (failed) and"
          " pending (queued); received_from / received_to match transfers with an instance"
          " received in the range",
          query=(*FILTER_FIELDS, "limit", "offset"), tags=TAGS),
    Route("GET", "/api/v1/transfers/{transfer_id}", transfer_detail, "jobs.read",
          "One transfer with its series, each with its instance count and per-destination"
          " progress (its instances: /api/v1/jobs?study_uid=...&calling_aet=...)", tags=TAGS),
]
