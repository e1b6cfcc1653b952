"""The rules screens: the list in evaluation order with up/down reordering, the editor for every
criterion, and dry runs ("test this rule", "which rules match") against an uploaded file or a
recent job. Changes go through the same functions as the API (web.api.rules).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from router.application.dry_run import recent_jobs
from router.config_types import docs_of
from router.domain.admin import rule_id
from router.domain.rule_conditions import OPERATORS
from router.domain.rules import RuleSpec
from web.api import rules as api
from web.api.common import ApiError, run_command
from web.api.file_managed import detach, refuse_if_managed
from web.auth import actor_of
from web.forms import at_fields
from web.keys import ROUTER_KEY
from web.render import render
from web.routes import Route

MESSAGES = {"created": "Rule created.", "saved": "Rule saved.", "deleted": "Rule deleted.",
            "moved": "Order changed."}
OP_LABELS = {"eq": "equals", "ne": "not equals", "in": "in list", "contains": "contains",
             "startswith": "starts with", "regex": "regex", "exists": "exists",
             "lt": "<", "gt": ">", "le": "<=", "ge": ">="}
LIST_FIELDS = ("calling_aet", "called_aet", "source_ip", "modality", "sop_class")
_INTEGER = re.compile(r"^[+-]?\d+$")
BLANK_ROW = {"tag": "", "op": "eq", "value": "", "insensitive": False, "error": ""}
NEW_RULE: dict[str, Any] = {
    "name": "", "priority": 100, "enabled": True, "stop": False, "description": "",
    "match": [], "destinations": [], **{key: [] for key in LIST_FIELDS},
    "granularity": None, "quiet_time": None, "expected_count": None, "amendments": "late_only",
    "transforms": []}


def href(name: str) -> str:
    return "/rules/" + quote(name, safe="")


def _split(text: object) -> list[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def _condition_value(op: str, text: str) -> Any:
    if op == "in":
        return _split(text)
    if op == "exists":
        return text.strip().lower() not in ("false", "no", "0")
    return text


def conditions_of(form: Any) -> list[dict[str, Any]]:
    """The tag conditions of a submitted editor (rows with an empty tag are dropped)."""
    rows = zip(form.getall("match_tag", []), form.getall("match_op", []),
               form.getall("match_value", []), form.getall("match_case", []), strict=False)
    out = []
    for tag, op, value, case in rows:
        if not str(tag).strip():
            continue
        condition: dict[str, Any] = {"tag": str(tag).strip(), "op": str(op),
                                     "value": _condition_value(str(op), str(value))}
        if case == "insensitive":
            condition["case_sensitive"] = False
        out.append(condition)
    return out


def rule_data(form: Any) -> dict[str, Any]:
    """The API-shaped rule of a submitted editor form."""
    priority = str(form.get("priority", "")).strip()
    data: dict[str, Any] = {
        "name": str(form.get("name", "")).strip(),
        "priority": int(priority) if _INTEGER.match(priority) else priority or 100,
        "enabled": form.get("enabled") == "on", "stop": form.get("stop") == "on",
        "description": str(form.get("description", "")).strip(),
        "match": conditions_of(form),
        "destinations": [str(d) for d in form.getall("destinations", [])],
        "transforms": _split(form.get("transforms")),
    }
    for key in LIST_FIELDS:
        data[key] = _split(form.get(key))
    data.update(grouping_of(form))
    return data


def grouping_of(form: Any) -> dict[str, Any]:
    """Series/study-level keys of the editor; empty fields leave them unset."""
    out: dict[str, Any] = {}
    for key in ("granularity", "quiet_time"):
        if value := str(form.get(key, "")).strip():
            out[key] = value
    count = str(form.get("expected_count", "")).strip()
    if count:
        out["expected_count"] = int(count) if _INTEGER.match(count) else count
    if form.get("amendments") == "whole_unit":
        out["amendments"] = "whole_unit"
    return out


def _rows(rule: dict[str, Any], errors: dict[str, str], blank: int = 1) -> list[dict[str, Any]]:
    rows = []
    for i, c in enumerate(rule.get("match", [])):
        value = c.get("value")
        text = (", ".join(map(str, value)) if isinstance(value, list | tuple)
                else ("true" if value else "false") if isinstance(value, bool) else str(value))
        error = "; ".join(f"{k.split('.', 1)[-1]}: {v}" for k, v in errors.items()
                          if k == f"match[{i}]" or k.startswith(f"match[{i}]."))
        rows.append({"tag": c.get("tag", ""), "op": c.get("op", "eq"), "value": text,
                     "insensitive": c.get("case_sensitive") is False, "error": error})
    return rows + [dict(BLANK_ROW) for _ in range(blank)]


async def _choices(request: web.Request) -> dict[str, Any]:
    router = request.app[ROUTER_KEY]
    jobs = await asyncio.to_thread(recent_jobs, router.view_db("jobs"), 20)
    return {"all_destinations": sorted(router.admin.snapshot().live_destinations()),
            "jobs": [{**j, "when": time.strftime("%Y-%m-%d %H:%M:%S",
                                                 time.gmtime(j["received_at"]))} for j in jobs],
            "ops": [(op, OP_LABELS.get(op, op)) for op in OPERATORS],
            "ae_title": router.settings.ae_title}


async def _editor(request: web.Request, rule: dict[str, Any], existing: str | None,
                  errors: dict[str, str] | None = None, status: int = 200, message: str = "",
                  result: dict[str, Any] | None = None, blank: int = 1) -> web.Response:
    errors = errors or {}
    from_config = managed = detached = False
    if existing is not None:
        items = await asyncio.to_thread(api.rule_items, request.app[ROUTER_KEY])
        item = next((i for i in items if i["name"] == existing), {})
        from_config = bool(item.get("from_config"))
        managed, detached = bool(item.get("managed_by_file")), bool(item.get("detached"))
    rule = {**NEW_RULE, **rule}
    lists = {k: ", ".join(map(str, rule[k])) for k in LIST_FIELDS}
    bad = {re.split(r"[\[.]", key, maxsplit=1)[0] for key in errors}
    return render(request, "rule_edit.html", status=status, rule=rule, lists=lists,
                  rows=_rows(rule, errors, blank), errors=errors, bad=bad, message=message,
                  problems=at_fields(errors), docs=docs_of(RuleSpec),
                  existing=existing, from_config=from_config, managed=managed,
                  detached=detached, result=result,
                  detach_action=href(existing) + "/detach" if existing else "",
                  versions_url=f"/audit/versions?object={rule_id(existing)}" if existing else "",
                  action=href(existing) + "/edit" if existing else "/rules",
                  delete_action=href(existing) + "/delete" if existing else "",
                  **await _choices(request))


async def list_page(request: web.Request, result: dict[str, Any] | None = None,
                    message: str = "", status: int = 200) -> web.Response:
    items = await asyncio.to_thread(api.rule_items, request.app[ROUTER_KEY])
    for item in items:
        item["href"] = href(item["name"])
    flash = MESSAGES.get(request.query.get("ok", ""))
    return render(request, "rules.html", status=status, items=items, flash=flash,
                  result=result, message=message, **await _choices(request))


async def new_page(request: web.Request) -> web.Response:
    return await _editor(request, {}, None, blank=2)


async def edit_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = api.find_rule(request.app[ROUTER_KEY], name)
    if found is None:
        raise web.HTTPNotFound(text="no such rule")
    return await _editor(request, found.spec.to_dict(), name)


async def _submit(request: web.Request, existing: str | None) -> web.Response:
    form = await request.post()
    data = rule_data(form)
    if existing is not None:
        data["name"] = existing
    action = str(form.get("action", "save"))
    if action == "add_condition":
        return await _editor(request, data, existing, blank=2)
    if action.startswith("remove_condition:"):
        index = action.split(":", 1)[1]
        data["match"] = [c for i, c in enumerate(data["match"]) if str(i) != index]
        return await _editor(request, data, existing)
    try:
        await api.save_rule(request, data, existing)
    except ApiError as exc:
        if exc.status == 404:
            raise web.HTTPNotFound(text="no such rule") from None
        return await _editor(request, data, existing, exc.fields or {"rule": exc.message},
                             status=exc.status, message=exc.message)
    raise web.HTTPFound("/rules?ok=" + ("saved" if existing else "created"))


async def create(request: web.Request) -> web.Response:
    return await _submit(request, None)


async def save(request: web.Request) -> web.Response:
    return await _submit(request, request.match_info["name"])


async def delete(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    if api.find_rule(router, name) is None:
        raise web.HTTPNotFound(text="no such rule")
    try:
        await asyncio.to_thread(refuse_if_managed, router, "rule", name)
    except ApiError as exc:
        found = api.find_rule(router, name)
        assert found is not None
        return await _editor(request, found.spec.to_dict(), name, status=exc.status,
                             message=exc.message)
    await run_command(router.commands.delete_rule, name, actor_of(request))
    raise web.HTTPFound("/rules?ok=deleted")


async def detach_page(request: web.Request) -> web.Response:
    """"Detach from the configuration file" (a confirming checkbox, a reason)."""
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    found = api.find_rule(router, name)
    if found is None:
        raise web.HTTPNotFound(text="no such rule")
    form = await request.post()
    if form.get("confirm") != "on":
        return await _editor(request, found.spec.to_dict(), name, status=422,
                             message="Tick the box to confirm detaching this rule from the "
                                     "configuration file.")
    await detach(request, "rule", name, str(form.get("reason", ""))[:500])
    raise web.HTTPFound(href(name) + "/edit")


async def move(request: web.Request) -> web.Response:
    """Swap a rule with its neighbour above or below, then renumber 10, 20, 30..."""
    router = request.app[ROUTER_KEY]
    form = await request.post()
    names = [r.spec.name for r in router.admin.snapshot().rules]
    name = request.match_info["name"]
    if name not in names:
        raise web.HTTPNotFound(text="no such rule")
    i = names.index(name)
    j = i - 1 if form.get("direction") == "up" else i + 1
    if 0 <= j < len(names):
        names[i], names[j] = names[j], names[i]
        await run_command(api.reorder, router, names, actor_of(request))
    raise web.HTTPFound("/rules?ok=moved")


async def _run(request: web.Request, form: Any, candidate: Any) -> dict[str, Any]:
    """Dry-run on the uploaded file or the chosen job of a form; ApiError on bad input."""
    upload = form.get("test_file")
    job_id = str(form.get("test_job_id", "")).strip() or str(form.get("test_job", "")).strip()
    if isinstance(upload, web.FileField) and upload.filename:
        return await api.dry_run_upload(
            request, upload.file, str(form.get("test_calling_aet", ""))[:64],
            str(form.get("test_called_aet", ""))[:64], str(form.get("test_source_ip", ""))[:64],
            candidate)
    if job_id:
        return await api.dry_run_job(request, job_id, candidate)
    raise ApiError(422, "Choose a DICOM file or a recent job to test with.")


async def test_rule(request: web.Request) -> web.Response:
    """"Test this rule": the editor's (unsaved) rule in place of the stored one."""
    form = await request.post()
    data = rule_data(form)
    existing = str(form.get("existing", "")) or None
    if existing:
        data["name"] = existing
    result: dict[str, Any] | None = None
    try:
        candidate = api.candidate_spec(request.app[ROUTER_KEY], data)
        result = {**await _run(request, form, candidate), "focus": data["name"]}
        message = ""
    except ApiError as exc:
        message = exc.message
    if request.headers.get("HX-Request"):
        return render(request, "_rules_result.html", result=result, message=message)
    return await _editor(request, data, existing, result=result, message=message)


async def dry_run_page(request: web.Request) -> web.Response:
    """Which stored rules match a file or a job."""
    form = await request.post()
    try:
        result: dict[str, Any] | None = {**await _run(request, form, None), "focus": None}
        message = ""
    except ApiError as exc:
        result, message = None, exc.message
    if request.headers.get("HX-Request"):
        return render(request, "_rules_result.html", result=result, message=message)
    return await list_page(request, result=result, message=message)


ROUTES = [
    Route("GET", "/rules", list_page, "rules.read", "Rules"),
    Route("POST", "/rules", create, "rules.write", "Create a rule"),
    Route("GET", "/rules/new", new_page, "rules.write", "New rule form"),
    Route("POST", "/rules/test", test_rule, "rules.read", "Test the rule in the editor"),
    Route("POST", "/rules/dry-run", dry_run_page, "rules.read", "Which rules match"),
    Route("GET", "/rules/{name}/edit", edit_page, "rules.read", "Rule editor"),
    Route("POST", "/rules/{name}/edit", save, "rules.write", "Save a rule"),
    Route("POST", "/rules/{name}/delete", delete, "rules.write", "Delete a rule"),
    Route("POST", "/rules/{name}/detach", detach_page, "rules.write",
          "Detach a rule from the configuration file"),
    Route("POST", "/rules/{name}/move", move, "rules.write", "Move a rule up or down"),
]
