"""The storage page: blob store use, retention, purge history and a "purge now" button."""

from __future__ import annotations

from aiohttp import web

from web.api.common import ApiError
from web.api.storage import overview, purge, result_json
from web.render import render
from web.routes import Route

MANAGE = "storage.manage"


async def show(request: web.Request, flash: str = "", flash_kind: str = "ok",
               status: int = 200) -> web.Response:
    data = await overview(request)
    return render(request, "storage.html", status=status, storage=data, flash=flash,
                  flash_kind=flash_kind)


async def page(request: web.Request) -> web.Response:
    return await show(request)


async def usage_fragment(request: web.Request) -> web.Response:
    data = await overview(request, fresh=True)
    return render(request, "_storage_usage.html", storage=data)


async def purge_now(request: web.Request) -> web.Response:
    try:
        result = result_json(await purge(request))
    except ApiError as exc:
        return await show(request, f"Nothing purged: {exc.message}", "warn", status=409)
    assert result is not None
    if result["jobs"] == 0:
        message = "Nothing to purge: no fully delivered job is older than the retention period."
    else:
        message = (f"Purged {result['jobs']} job(s): {result['blobs']} stored object(s) "
                   f"deleted, {result['size_freed']} freed.")
    return await show(request, message)


ROUTES = [
    Route("GET", "/storage", page, MANAGE, "Storage"),
    Route("GET", "/storage/usage", usage_fragment, MANAGE, "Storage use (measured now)"),
    Route("POST", "/storage/purge", purge_now, MANAGE, "Purge now"),
]
