"""The settings page: the effective configuration by section, where each value comes from, and
a form for each runtime-changeable setting (for roles with settings.write)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from router.application.runtime_settings import RUNTIME_SETTINGS
from web.api.common import ApiError
from web.api.settings import change_setting as change_runtime
from web.api.settings import describe
from web.auth import current_user
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route


async def settings_page(request: web.Request, flash: str = "", flash_kind: str = "ok",
                        errors: dict[str, str] | None = None, status: int = 200
                        ) -> web.Response:
    router = request.app[ROUTER_KEY]
    runtime = await asyncio.to_thread(router.runtime.all)
    if not flash and request.query.get("done") == "changed":
        flash = "Setting changed."
    return render(request, "settings.html", status=status,
                  settings=describe(router.settings, runtime), runtime=runtime,
                  can_write=current_user(request).can("settings.write"),
                  errors=errors or {}, flash=flash, flash_kind=flash_kind)


async def show(request: web.Request) -> web.Response:
    return await settings_page(request)


async def change(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    form = await request.post()
    raw = str(form.get("value", "")).strip()
    if name not in RUNTIME_SETTINGS:
        raise web.HTTPNotFound(text="this setting cannot change at run time")
    value: int | None = None
    if raw and form.get("reset") is None:
        try:
            value = int(raw)
        except ValueError:
            return await settings_page(request, "Not changed: enter a whole number.", "error",
                                       {name: "a whole number"}, status=422)
    try:
        await change_runtime(request, name, value)
    except ApiError as exc:
        return await settings_page(request, f"Not changed: {exc.message}", "error",
                                   {name: exc.message}, status=422)
    raise web.HTTPSeeOther("/settings?done=changed")


ROUTES = [
    Route("GET", "/settings", show, "settings.read", "Settings"),
    Route("POST", "/settings/{name}", change, "settings.write", "Change a runtime setting"),
]
