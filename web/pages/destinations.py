"""The destinations screens: list with health and backlog, per-kind forms built from the config
dataclasses, test connection, pause/resume and delete. Changes go through the same functions
as the API (web.api.destinations), so the same validation and events apply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import types
import typing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from projections.destinations_queries import age_text, when_text
from router.config_types import docs_of
from router.dispatch.registry import DESTINATION_KINDS, DESTINATION_NAME, DestinationKind
from router.domain.admin import destination_id
from web.api import destinations as api
from web.api.common import ApiError, run_command
from web.api.file_managed import detach, managed_message
from web.auth import actor_of
from web.forms import at_fields
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.render import render
from web.routes import Route

# key -> label for the form fields of every kind (unknown keys get a generated label); the
# help texts are the config classes' own descriptions (Doc), as in the OpenAPI document.
LABELS: dict[str, str] = {
    "host": "Host", "port": "Port", "ae_title": "Called AE title",
    "calling_ae": "Calling AE title", "timeout": "Timeout",
    "idle_close": "Close idle association after", "max_pdu": "Maximum PDU we receive",
    "concurrency": "Parallel deliveries", "enabled": "Enabled", "description": "Description",
    "path": "Folder", "template": "Name template", "bucket": "Bucket", "prefix": "Key prefix",
    "endpoint_url": "Endpoint URL", "region": "Region", "access_key_id": "Access key ID",
    "secret_access_key": "Secret access key", "session_token": "Session token",
    "storage_class": "Storage class", "multipart_threshold": "Multipart threshold",
    "tls": "DICOM TLS", "tls_ca_certificates": "TLS: trusted CA file",
    "tls_certificate": "TLS: our certificate", "tls_private_key": "TLS: our private key",
    "tls_profile": "TLS profile", "tls_server_name": "TLS: name in the peer's certificate",
    "transforms": "Transforms", "url": "URL", "send": "Send", "secret": "Secret",
    "callback_timeout": "Callback timeout", "quiet_time": "Quiet time",
    "expected_count": "Expected count", "deidentify": "De-identify",
    "request_timeout": "Request timeout",
}
MESSAGES = {"created": "Destination created.", "saved": "Destination saved.",
            "deleted": "Destination deleted.", "paused": "Deliveries paused.",
            "resumed": "Deliveries resumed.", "unchanged": "Nothing changed."}
_INTEGER = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")


@dataclass(frozen=True)
class FormField:
    """One input of a destination form."""

    key: str
    label: str
    help: str
    input: str  # text | number | checkbox | secret
    required: bool
    value: Any
    error: str = ""
    secret_set: bool = False


def _base_hint(hint: Any) -> tuple[Any, bool]:
    """(type without None, optional?)"""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def form_fields(kind: DestinationKind, values: dict[str, Any], errors: dict[str, str],
                secrets_set: dict[str, bool]) -> list[FormField]:
    hints = typing.get_type_hints(kind.config_class)
    docs = docs_of(kind.config_class)
    problems = at_fields(errors)  # transforms[1]: ... shown at transforms
    out = []
    for spec in dataclasses.fields(kind.config_class):
        base, optional = _base_hint(hints[spec.name])
        label = LABELS.get(spec.name, spec.name.replace("_", " ").capitalize())
        help_text = docs.get(spec.name, "")
        default = None if spec.default is dataclasses.MISSING else spec.default
        value = values.get(spec.name, default)
        widget = ("secret" if spec.name in kind.secret_fields else "checkbox" if base is bool
                  else "number" if base is int else "text")
        if typing.get_origin(base) is tuple and isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value)  # a list of names: one text field
        out.append(FormField(
            key=spec.name, label=label, help=help_text, input=widget,
            required=spec.default is dataclasses.MISSING and not optional,
            value="" if widget == "secret" or value is None else value,
            error=problems.get(spec.name, ""), secret_set=secrets_set.get(spec.name, False)))
    return out


def form_data(kind: DestinationKind, form: Any) -> dict[str, Any]:
    """The API-shaped dict of a submitted form: empty fields are left out (defaults apply,
    stored secrets are kept), numbers parsed where they parse (else the parser says why)."""
    hints = typing.get_type_hints(kind.config_class)
    data: dict[str, Any] = {"type": kind.name}
    for spec in dataclasses.fields(kind.config_class):
        key = spec.name
        base, _ = _base_hint(hints[key])
        if base is bool:
            data[key] = form.get(key) == "on"
            continue
        raw = str(form.get(key, "")).strip()
        if key in kind.secret_fields and form.get("clear_" + key) == "on":
            data[key] = None
        elif not raw:
            continue
        elif base is int and _INTEGER.match(raw):
            data[key] = int(raw)
        elif base is float and _NUMBER.match(raw):
            data[key] = float(raw)
        elif typing.get_origin(base) is tuple:
            data[key] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            data[key] = raw
    return data


def _target(item: dict[str, Any]) -> str:
    c = item["config"]
    if item["type"] == "dicom":
        return f"{c.get('ae_title')} @ {c.get('host')}:{c.get('port')}"
    if item["type"] == "file":
        return str(c.get("path"))
    if item["type"] == "s3":
        where = f" at {c['endpoint_url']}" if c.get("endpoint_url") else ""
        return f"s3://{c.get('bucket')}/{c.get('prefix') or ''}{where}"
    return item["type"]


def _display(item: dict[str, Any], now: float) -> dict[str, Any]:
    h = item["health"]
    return {**item, "href": "/destinations/" + quote(item["name"], safe=""),
            "target": _target(item), "oldest": age_text(h["oldest_pending_age"]),
            "last_success": when_text(h["last_success_at"], now),
            "last_failure": when_text(h["last_failure_at"], now)}


async def _list_context(request: web.Request) -> dict[str, Any]:
    router = request.app[ROUTER_KEY]
    items, healths = await asyncio.to_thread(api.load_all, router)
    now = time.time()
    known = {i["name"] for i in items}
    orphans = [h for n, h in healths.items() if n not in known and h.backlog]
    return {"items": [_display(i, now) for i in items], "orphans": orphans,
            "kinds": list(DESTINATION_KINDS)}


async def list_page(request: web.Request) -> web.Response:
    context = await _list_context(request)
    if request.query.get("fragment") == "rows":
        return render(request, "_destinations_rows.html", **context)
    return render(request, "destinations.html", flash=MESSAGES.get(request.query.get("ok", "")),
                  **context)


def _edit(request: web.Request, kind: DestinationKind, values: dict[str, Any],
          errors: dict[str, str] | None = None, existing: dict[str, Any] | None = None,
          status: int = 200, message: str = "", check: dict[str, Any] | None = None
          ) -> web.Response:
    secrets_set = {k: v == "set" for k, v in (existing or {}).get("secrets", {}).items()}
    return render(request, "destination_edit.html", status=status, kind=kind.name,
                  fields=form_fields(kind, values, errors or {}, secrets_set),
                  existing=existing, errors=errors or {}, message=message, check=check,
                  versions_url=(f"/audit/versions?object={destination_id(existing['name'])}"
                                if existing else ""),
                  action=existing["href"] + "/edit" if existing else "/destinations")


def _kind(name: object) -> DestinationKind:
    kind = DESTINATION_KINDS.get(str(name))
    if kind is None:
        raise web.HTTPBadRequest(text="unknown destination type")
    return kind


async def _existing(request: web.Request) -> dict[str, Any]:
    router = request.app[ROUTER_KEY]
    try:
        item = await asyncio.to_thread(api.load_one, router, request.match_info["name"])
    except ApiError:
        raise web.HTTPNotFound(text="no such destination") from None
    return _display(item, time.time())


async def new_page(request: web.Request) -> web.Response:
    kind = _kind(request.query.get("type", "dicom"))
    return _edit(request, kind, {})


async def edit_page(request: web.Request) -> web.Response:
    item = await _existing(request)
    kind = _kind(item["type"])
    return _edit(request, kind, {"name": item["name"], **item["config"]}, existing=item)


async def _submit(request: web.Request, existing: dict[str, Any] | None) -> web.Response:
    form = await request.post()
    kind = _kind(existing["type"] if existing else form.get("type"))
    data = form_data(kind, form)
    data["name"] = existing["name"] if existing else str(form.get("name", "")).strip()
    try:
        await api.save(request, data, create=existing is None)
    except ApiError as exc:
        if exc.status == 404:
            raise web.HTTPNotFound(text="no such destination") from None
        shown = {k: v for k, v in data.items() if k not in kind.secret_fields}
        return _edit(request, kind, shown, exc.fields or {"destination": exc.message},
                     existing, status=422 if exc.status == 422 else exc.status,
                     message=exc.message)
    raise web.HTTPFound("/destinations?ok=" + ("saved" if existing else "created"))


async def create(request: web.Request) -> web.Response:
    return await _submit(request, None)


async def save(request: web.Request) -> web.Response:
    return await _submit(request, await _existing(request))


async def delete(request: web.Request) -> web.Response:
    item = await _existing(request)
    router = request.app[ROUTER_KEY]
    rules = api.users_of(router, item["name"])
    if rules:
        kind = _kind(item["type"])
        message = (f"Used by rule(s) {', '.join(rules)}: remove it from them before deleting.")
        values = {"name": item["name"], **item["config"]}
        return _edit(request, kind, values, existing=item, status=409, message=message)
    if item["managed_by_file"]:
        values = {"name": item["name"], **item["config"]}
        return _edit(request, _kind(item["type"]), values, existing=item, status=409,
                     message=managed_message("destination", item["name"]))
    await run_command(router.commands.delete_destination, item["name"], actor_of(request))
    raise web.HTTPFound("/destinations?ok=deleted")


async def detach_page(request: web.Request) -> web.Response:
    """"Detach from the configuration file" (a confirming checkbox, a reason)."""
    item = await _existing(request)
    form = await request.post()
    if form.get("confirm") != "on":
        values = {"name": item["name"], **item["config"]}
        return _edit(request, _kind(item["type"]), values, existing=item, status=422,
                     message="Tick the box to confirm detaching this destination from the "
                             "configuration file.")
    await detach(request, "destination", item["name"], str(form.get("reason", ""))[:500])
    raise web.HTTPFound(item["href"] + "/edit")


async def _pause(request: web.Request, paused: bool) -> web.Response:
    item = await _existing(request)
    router = request.app[ROUTER_KEY]
    await run_command(router.commands.pause_destination, item["name"], actor_of(request),
                      paused)
    raise web.HTTPFound("/destinations?ok=" + ("paused" if paused else "resumed"))


async def pause(request: web.Request) -> web.Response:
    return await _pause(request, True)


async def resume(request: web.Request) -> web.Response:
    return await _pause(request, False)


async def test(request: web.Request) -> web.Response:
    """Test a saved destination: a fragment for HTMX, else the list with the result."""
    item = await _existing(request)
    router = request.app[ROUTER_KEY]
    state = api.live(router).get(item["name"])
    if state is None:
        raise web.HTTPNotFound(text="no such destination")
    result = {"name": item["name"], **await api.check(router, state.config)}
    if request.headers.get("HX-Request"):
        return render(request, "_destinations_test.html", check=result)
    return render(request, "destinations.html", check=result, **await _list_context(request))


UNSAVED = "unsaved-destination"


async def check_form(request: web.Request) -> web.Response:
    """Test the settings in the form (before saving; stored secrets fill empty fields)."""
    form = await request.post()
    kind = _kind(form.get("type"))
    router = request.app[ROUTER_KEY]
    name = str(form.get("name", "")).strip()
    data = {**form_data(kind, form), "name": name}
    state = api.live(router).get(name) if form.get("existing") == name else None
    merged = api.with_kept_secrets(data, state.config if state else None)
    # The connection does not depend on the name: test a new destination whatever its name
    # field holds (saving checks the name and says what is wrong with it).
    tested = {**merged, "name": name if DESTINATION_NAME.match(name) else UNSAVED}
    result = {"name": name or UNSAVED, **await api.check(router, tested)}
    if request.headers.get("HX-Request"):
        return render(request, "_destinations_test.html", check=result)
    existing = await _existing_or_none(router, name if state else None)
    shown = {k: v for k, v in data.items() if k not in kind.secret_fields}
    return _edit(request, kind, shown, result.get("fields"), existing, check=result)


async def _existing_or_none(router: RouterPort, name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    return _display(await asyncio.to_thread(api.load_one, router, name), time.time())


ROUTES = [
    Route("GET", "/destinations", list_page, "destinations.read", "Destinations"),
    Route("POST", "/destinations", create, "destinations.write", "Create a destination"),
    Route("GET", "/destinations/new", new_page, "destinations.write", "New destination form"),
    Route("POST", "/destinations/check", check_form, "destinations.write",
          "Test the settings of a destination form"),
    Route("GET", "/destinations/{name}/edit", edit_page, "destinations.read",
          "Destination settings"),
    Route("POST", "/destinations/{name}/edit", save, "destinations.write",
          "Save a destination"),
    Route("POST", "/destinations/{name}/delete", delete, "destinations.write",
          "Delete a destination"),
    Route("POST", "/destinations/{name}/detach", detach_page, "destinations.write",
          "Detach a destination from the configuration file"),
    Route("POST", "/destinations/{name}/pause", pause, "destinations.write",
          "Pause a destination"),
    Route("POST", "/destinations/{name}/resume", resume, "destinations.write",
          "Resume a destination"),
    Route("POST", "/destinations/{name}/test", test, "destinations.write",
          "Test a destination's connection"),
]
