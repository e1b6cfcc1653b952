"""The blob store under ``/api/v1/storage`` (storage.manage): disk use and free space, the
retention setting and its periodic run, purges (each a set of ``Job.BlobPurged`` events with
their actor) and "purge now" as the caller.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from projections import storage_queries
from projections.db import ViewDatabase
from router.application.commands import CommandError
from router.application.retention import RETENTION_SETTING, PurgeResult
from web import freshness
from web.api.common import ApiError, json_response, paging
from web.api.settings import iso, runtime_json
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.routes import Route

MANAGE = "storage.manage"
PURGE_WAIT_S = 5.0  # "purge now" answers once the jobs view shows the purge

def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def purge_runs(db: ViewDatabase, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    rows, total = storage_queries.purge_runs(db, limit, offset)
    runs = [{"purge_id": r["purge_id"], "purged_at": iso(float(r["purged_at"])),
             "actor": r["actor"], "jobs": int(r["jobs"]), "objects": int(r["objects"]),
             "bytes": int(r["total_size"] or 0),
             "size": human_bytes(int(r["total_size"] or 0))} for r in rows]
    return runs, total


def result_json(result: PurgeResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    data = asdict(result)
    for key in ("started_at", "finished_at", "cutoff"):
        data[key] = iso(data[key])
    data["size_freed"] = human_bytes(result.bytes_freed)
    return data


async def overview(request: web.Request, fresh: bool = False) -> dict[str, Any]:
    """Usage, retention and the latest purges (shared with the storage page)."""
    router = request.app[ROUTER_KEY]
    retention = router.retention
    usage = await asyncio.to_thread(retention.usage, fresh)
    setting = await asyncio.to_thread(router.runtime.get, RETENTION_SETTING)
    runs, total = await asyncio.to_thread(purge_runs, router.view_db("jobs"), 20, 0)
    used = usage.total_bytes - usage.free_bytes
    return {
        "blob_store": {
            "backend": router.settings.storage.backend,  # "s3": the counts are the cache's
            "path": usage.path, "bytes": usage.bytes, "objects": usage.objects,
            "size": human_bytes(usage.bytes), "free_bytes": usage.free_bytes,
            "free": human_bytes(usage.free_bytes), "filesystem_bytes": usage.total_bytes,
            "filesystem": human_bytes(usage.total_bytes),
            "filesystem_used_percent": round(100 * used / usage.total_bytes, 1)
            if usage.total_bytes else None,
            "measured_at": iso(usage.measured_at)},
        "retention": {
            "days": setting.value, "enabled": setting.value > 0, "setting": runtime_json(setting),
            "interval_seconds": retention.interval,
            "next_run_at": iso(retention.next_run_at) if setting.value > 0 else None,
            "last_run": result_json(retention.last)},
        "purges": {"total": total, "items": runs},
    }


async def get_storage(request: web.Request) -> web.Response:
    return json_response(await overview(request, fresh=request.query.get("fresh") == "1"))


async def list_purges(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    router = request.app[ROUTER_KEY]
    runs, total = await asyncio.to_thread(purge_runs, router.view_db("jobs"), limit, offset)
    return json_response({"total": total, "limit": limit, "offset": offset, "items": runs})


async def purge(request: web.Request) -> PurgeResult:
    """Run retention now as the caller; 409 when it is off or already running. Returns once
    the jobs view shows the purge (or after a few seconds)."""
    router = request.app[ROUTER_KEY]
    try:
        result = await asyncio.to_thread(router.retention.run, actor_of(request))
    except CommandError as exc:
        raise ApiError(409, str(exc)) from None
    if result.jobs:
        await freshness.fresh(request, "jobs", timeout=PURGE_WAIT_S)
    return result


async def purge_now(request: web.Request) -> web.Response:
    return json_response(result_json(await purge(request)))


ROUTES = [
    Route("GET", "/api/v1/storage", get_storage, MANAGE,
          "Blob store use and free space, retention and the latest purges",
          query=("fresh",), tags=("storage",)),
    Route("GET", "/api/v1/storage/purges", list_purges, MANAGE,
          "Purge runs, newest first (who, when, jobs, objects, bytes)",
          query=("limit", "offset"), tags=("storage",)),
    Route("POST", "/api/v1/storage/purge", purge_now, MANAGE,
          "Purge now what the retention setting allows (never an undelivered job)",
          tags=("storage",)),
]
