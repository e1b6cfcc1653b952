"""The remote PACS screen (``/remote``): remote nodes (list, create, edit, delete, C-ECHO), a
C-FIND form with results, C-MOVE/C-GET buttons and the retrieve jobs with live progress.

Changes go through the same functions as the API (web.api.remote): same validation, events
and access records. Plain forms post and redirect; HTMX swaps fragments in place.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from aiohttp import web

from router.application.remote_nodes import TLS_KEYS, RemoteNodeConfig
from router.application.retrieve import RemoteError
from router.config_types import docs_of
from web.api import remote as api
from web.api.common import ApiError, validate
from web.auth import actor_of, current_user
from web.forms import at_fields
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

NODE_FIELDS = ("name", "ae_title", "host", "port", "description")
QUERY_FIELDS = ("node", "level", "patient_name", "patient_id", "study_date_from",
                "study_date_to", "modality", "accession_number", "description",
                "study_instance_uid")
DONE = {"created": "Remote node created.", "saved": "Remote node saved.",
        "unchanged": "Nothing changed.", "deleted": "Remote node deleted."}
JOBS_SHOWN = 20


def _is_htmx(request: web.Request) -> bool:
    return bool(request.headers.get("HX-Request"))


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str) and k != "csrf_token"}


def _nodes(request: web.Request) -> list[dict[str, Any]]:
    nodes = request.app[ROUTER_KEY].remote_nodes.state.nodes()
    return [{**api.describe_node(nodes[n]), "href": "/remote/" + quote(n, safe="")}
            for n in sorted(nodes)]


async def remote_page(request: web.Request) -> web.Response:
    query = {key: request.query.get(key, "") for key in QUERY_FIELDS}
    nodes = _nodes(request)
    query["node"] = query["node"] or (nodes[0]["name"] if nodes else "")
    return render(request, "remote.html", nodes=nodes, query=query,
                  jobs=await api.list_jobs(request, limit=JOBS_SHOWN),
                  can_write=current_user(request).can("remote.write"),
                  flash=DONE.get(request.query.get("done", ""), ""))


# -- nodes -----------------------------------------------------------------------------------


def _node_data(form: dict[str, str], name: str | None) -> dict[str, Any]:
    port = form.get("port", "").strip()
    return {"name": name if name is not None else form.get("name", "").strip(),
            "ae_title": form.get("ae_title", "").strip(), "host": form.get("host", "").strip(),
            "port": int(port) if port.isdigit() else port or None,
            "services": [s for s in ("find", "move", "get") if form.get(f"service_{s}")],
            "description": form.get("description", "").strip(),
            "tls": form.get("tls") == "on",
            **{key: form.get(key, "").strip() for key in TLS_KEYS[1:] if form.get(key)}}


def _form_page(request: web.Request, values: dict[str, Any], errors: dict[str, str],
               creating: bool, status: int = 200) -> web.Response:
    action = "/remote/new" if creating else f"/remote/{quote(values['name'], safe='')}/edit"
    return render(request, "remote_form.html", status=status, values=values,
                  errors=at_fields(errors), docs=docs_of(RemoteNodeConfig),
                  creating=creating, action=action,
                  flash="Please correct the highlighted fields." if errors else "",
                  flash_kind="error")


async def new_page(request: web.Request) -> web.Response:
    values = {"name": "", "ae_title": "", "host": "", "port": 104,
              "services": [], "description": ""}  # no Q/R rights until ticked
    return _form_page(request, values, {}, creating=True)


async def edit_page(request: web.Request) -> web.Response:
    node = api.node_or_404(request, request.match_info["name"])
    return _form_page(request, api.describe_node(node), {}, creating=False)


async def _save(request: web.Request, name: str | None) -> web.Response:
    data = _node_data(await _form(request), name)
    try:
        changed = await api.save_node(request, data, create=name is None)
    except ApiError as exc:
        if exc.status == 404:
            raise web.HTTPNotFound() from None
        errors = exc.fields or {"name": exc.message}
        if exc.status == 409 and name is not None:  # managed by the configuration file
            values = api.describe_node(api.node_or_404(request, name))
            return _form_page(request, values, {"name": exc.message}, creating=False,
                              status=409)
        return _form_page(request, data, errors, creating=name is None, status=422)
    done = "created" if name is None else "saved" if changed else "unchanged"
    raise web.HTTPSeeOther(f"/remote?done={done}")


async def create(request: web.Request) -> web.Response:
    return await _save(request, None)


async def save(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    api.node_or_404(request, name)
    return await _save(request, name)


async def delete(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    api.refuse_if_managed(api.node_or_404(request, request.match_info["name"]))
    await api.call(router.remote_nodes.delete, request.match_info["name"], actor_of(request))
    if _is_htmx(request):  # asked for with hx-confirm: let the browser load the list
        return web.Response(status=204, headers={"HX-Redirect": "/remote?done=deleted"})
    raise web.HTTPSeeOther("/remote?done=deleted")


async def detach(request: web.Request) -> web.Response:
    """"Detach from the configuration file" (a confirming checkbox, a reason)."""
    name = request.match_info["name"]
    node = api.node_or_404(request, name)
    form = await _form(request)
    if form.get("confirm") != "on":
        return _form_page(request, api.describe_node(node), {
            "name": "Tick the box to confirm detaching this node from the configuration "
                    "file."}, creating=False, status=422)
    await api.call(request.app[ROUTER_KEY].remote_nodes.detach, name, actor_of(request),
                   form.get("reason", "")[:500])
    raise web.HTTPSeeOther(f"/remote/{quote(name, safe='')}/edit")


async def echo(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    api.node_or_404(request, name)
    try:
        detail = await asyncio.to_thread(request.app[ROUTER_KEY].retriever.echo, name)
        ok = True
    except RemoteError as exc:
        detail, ok = str(exc), False
    return render(request, "_remote_echo.html", ok=ok, detail=detail, name=name)


# -- query and retrieve ----------------------------------------------------------------------


async def query(request: web.Request) -> web.Response:
    form = {key: request.query.get(key, "").strip() for key in QUERY_FIELDS}
    values: dict[str, Any] = {"query": form, "results": [], "errors": {}, "truncated": False}
    try:
        body = validate(api.FindBody, {k: v for k, v in form.items() if k != "node" and v})
        result = await api.call(request.app[ROUTER_KEY].retriever.find, form["node"],
                                body.request(), actor_of(request))
        values.update(results=result.rows, truncated=result.truncated, level=body.level)
    except ApiError as exc:
        values["errors"] = exc.fields or {"node": exc.message}
    values.setdefault("level", form["level"] or "STUDY")
    if _is_htmx(request):
        return render(request, "_remote_results.html", **values)
    status = 422 if values["errors"] else 200
    return render(request, "remote.html", status=status, nodes=_nodes(request),
                  jobs=await api.list_jobs(request, limit=JOBS_SHOWN),
                  can_write=current_user(request).can("remote.write"), **values)


async def retrieve(request: web.Request) -> web.Response:
    form = await _form(request)
    method = form.get("method", "")
    if method not in ("move", "get"):
        raise web.HTTPBadRequest(text="method must be move or get")
    error = ""
    try:
        body = validate(api.RetrieveBody, {
            "study_instance_uid": form.get("study_instance_uid", ""),
            "series_instance_uid": form.get("series_instance_uid") or None})
        await api.start_retrieve(request, request.match_info["name"], method, body)
    except ApiError as exc:
        if not _is_htmx(request):
            raise
        error = "; ".join(exc.fields.values()) if exc.fields else exc.message
    if not _is_htmx(request):
        raise web.HTTPSeeOther("/remote#retrieves")
    return render(request, "_remote_jobs.html", error=error,
                  jobs=await api.list_jobs(request, limit=JOBS_SHOWN))


async def progress(request: web.Request) -> web.Response:
    """One job's status and counts (no identifiers: polled without an access record)."""
    job = request.app[ROUTER_KEY].remote_nodes.state.retrieve(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound()
    return render(request, "_remote_progress.html", job={
        "id": job.id, "status": job.status, "reason": job.reason, **job.counts})


ROUTES: list[Route] = [
    Route("GET", "/remote", remote_page, "remote.read", "Remote PACS"),
    Route("GET", "/remote/new", new_page, "remote.write", "New remote node form"),
    Route("POST", "/remote/new", create, "remote.write", "Create a remote node"),
    Route("GET", "/remote/query", query, "remote.read", "C-FIND a remote node"),
    Route("GET", "/remote/retrieves/{job_id}/progress", progress, "remote.read",
          "Progress of a retrieve job"),
    Route("GET", "/remote/{name}/edit", edit_page, "remote.write", "Edit a remote node"),
    Route("POST", "/remote/{name}/edit", save, "remote.write", "Save a remote node"),
    Route("POST", "/remote/{name}/delete", delete, "remote.write", "Delete a remote node"),
    Route("POST", "/remote/{name}/detach", detach, "remote.write",
          "Detach a remote node from the configuration file"),
    Route("POST", "/remote/{name}/echo", echo, "remote.read", "C-ECHO a remote node"),
    Route("POST", "/remote/{name}/retrieve", retrieve, "remote.read",
          "Retrieve a study or series (C-MOVE or C-GET)"),
]
