"""The settings page: the effective configuration by section, where each value comes from, and
a form for each runtime-changeable setting (for roles with settings.write)."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from router.application.runtime_settings import RUNTIME_SETTINGS
from router.config_types import unwrapped
from web.api.common import ApiError, validate
from web.api.settings import RuntimeChange, describe
from web.api.settings import change_setting as change_runtime
from web.auth import current_user
from web.forms import at_fields
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

_INTEGER = re.compile(r"^[+-]?\d+$")


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
    """One runtime setting from its form, validated by the API's body model (the settings
    field's own annotations): the same words as the API and the file."""
    name = request.match_info["name"]
    form = await request.post()
    raw = str(form.get("value", "")).strip()
    spec = RUNTIME_SETTINGS.get(name)
    if spec is None:
        raise web.HTTPNotFound(text="this setting cannot change at run time")
    value: object = None  # back to the file's value
    if raw and form.get("reset") is None:
        # A form sends text: a whole number becomes one, anything else is judged as given.
        whole = unwrapped(spec.annotation) is int and _INTEGER.match(raw)
        value = int(raw) if whole else raw
    try:
        body = validate(RuntimeChange, {"value": value})
        await change_runtime(request, name, body.value)
    except ApiError as exc:
        problem = at_fields(exc.fields).get("value", exc.message)
        return await settings_page(request, f"Not changed: {problem}", "error",
                                   {name: problem}, status=422)
    raise web.HTTPSeeOther("/settings?done=changed")


ROUTES = [
    Route("GET", "/settings", show, "settings.read", "Settings"),
    Route("POST", "/settings/{name}", change, "settings.write", "Change a runtime setting"),
]
