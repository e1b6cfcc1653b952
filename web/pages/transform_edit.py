"""Creating, editing and deleting a transform from the UI: name, kind, description, and the
kind's options as JSON (the same keys as the TOML file). Saved through the same commands as
the API, so each change is a Transform event with the acting user; errors name the field.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web

from router.transforms.spec import KINDS
from web.api.common import ApiError, run_command
from web.api.transforms import from_file, refuse_if_from_file, validate_transform
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

EXAMPLES = {
    "deidentify": {"project": "my-project", "retain_dates": "shift"},
    "morph": {"ops": [{"op": "set", "tag": "InstitutionName", "value": "North Clinic",
                       "when": [{"calling_aet": "CT_NORTH*"}]}]},
    "charset": {},
}
_COMMON = ("name", "kind", "description")


def href(name: str) -> str:
    return "/transforms/" + quote(name, safe="")


def _editor(request: web.Request, values: dict[str, Any], existing: str | None,
            errors: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return render(request, "transform_edit.html", status=status, values=values,
                  existing=existing, errors=errors or {}, kinds=KINDS,
                  from_file=existing is not None and from_file(request.app[ROUTER_KEY], existing),
                  action=href(existing) + "/edit" if existing else "/transforms",
                  examples={k: json.dumps(v, indent=2) for k, v in EXAMPLES.items()})


def _values(spec: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in spec.items() if k not in _COMMON}
    return {"name": spec.get("name", ""), "kind": spec.get("kind", "deidentify"),
            "description": spec.get("description", ""),
            "options": json.dumps(options, indent=2)}


async def new_page(request: web.Request) -> web.Response:
    return _editor(request, {"name": "", "kind": "deidentify", "description": "",
                             "options": json.dumps(EXAMPLES["deidentify"], indent=2)}, None)


async def edit_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = request.app[ROUTER_KEY].admin.snapshot().transforms.get(name)
    if found is None:
        raise web.HTTPNotFound(text="no such transform")
    return _editor(request, _values(found.spec.to_dict()), name)


async def _submit(request: web.Request, existing: str | None) -> web.Response:
    router = request.app[ROUTER_KEY]
    form = await request.post()
    values = {k: str(form.get(k, "")).strip() for k in ("name", "kind", "description")}
    values["options"] = str(form.get("options", ""))
    if existing is not None:
        values["name"] = existing
        if existing not in router.admin.snapshot().transforms:
            raise web.HTTPNotFound(text="no such transform")
    try:
        options = json.loads(values["options"] or "{}")
    except ValueError as exc:
        return _editor(request, values, existing, {"options": f"not JSON: {exc}"}, 422)
    if not isinstance(options, dict):
        return _editor(request, values, existing, {"options": "expected a JSON object"}, 422)
    data = {**options, "name": values["name"], "kind": values["kind"]}
    if values["description"]:
        data["description"] = values["description"]
    try:
        if existing is not None:
            refuse_if_from_file(router, existing)
        spec = validate_transform(data)
        if existing is None and spec["name"] in router.admin.snapshot().transforms:
            raise ApiError(409, "already exists", {"name": "already exists"})
        await run_command(router.commands.put_transform, spec, actor_of(request))
    except ApiError as exc:
        return _editor(request, values, existing, exc.fields or {"transform": exc.message},
                       422 if exc.status == 422 else exc.status)
    raise web.HTTPFound("/transforms?ok=" + ("saved" if existing else "created"))


async def create(request: web.Request) -> web.Response:
    return await _submit(request, None)


async def save(request: web.Request) -> web.Response:
    return await _submit(request, request.match_info["name"])


async def delete(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    try:
        refuse_if_from_file(router, name)
        await run_command(router.commands.delete_transform, name, actor_of(request))
    except ApiError as exc:
        found = router.admin.snapshot().transforms.get(name)
        if found is None:
            raise web.HTTPNotFound(text="no such transform") from None
        return _editor(request, _values(found.spec.to_dict()), name,
                       {"transform": exc.message}, exc.status)
    raise web.HTTPFound("/transforms?ok=deleted")


ROUTES = [
    Route("GET", "/transforms/new", new_page, "transforms.write", "New transform"),
    Route("POST", "/transforms", create, "transforms.write", "Create a transform"),
    Route("GET", "/transforms/{name}/edit", edit_page, "transforms.read", "Edit a transform"),
    Route("POST", "/transforms/{name}/edit", save, "transforms.write", "Save a transform"),
    Route("POST", "/transforms/{name}/delete", delete, "transforms.write",
          "Delete a transform"),
]
