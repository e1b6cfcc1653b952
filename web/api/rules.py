"""REST API for routing rules: CRUD, reorder, and dry runs against an uploaded file or a past job.

Bodies are validated by the domain's ``parse_rule`` (the same messages, with the same paths, as
for the TOML file: ``match[1].op``); the OpenAPI document's rule body is made from
``RuleSpec``'s own annotations and descriptions, so it cannot drift from what is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

from projections.destinations_queries import declared_by_config
from router.application.dry_run import (
    DryRunError,
    JobInput,
    JobNotFound,
    dry_run,
    header_of_upload,
    job_input,
    upload_input,
    with_candidate,
)
from router.application.sessions import AccessRecord
from router.domain.rules import RoutingInput, RuleError, RuleSpec, VersionedRule, parse_rule
from web.api.common import (
    ApiError,
    RawObject,
    config_body_model,
    json_response,
    read_json,
    run_command,
    validate,
)
from web.api.file_managed import refuse_if_managed
from web.auth import actor_of, record_access
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

# -- documentation models --------------------------------------------------------------------


# RuleSpec's own annotations: keys, types, defaults and descriptions. Bodies are validated by
# parse_rule, as the TOML file's [[rules]] are.
RuleBody = config_body_model("RuleBody", RuleSpec, optional=frozenset({"name"}))


class ReorderBody(BaseModel):
    """Every rule's name in the new evaluation order; priorities become 10, 20, 30..."""

    names: list[str] = Field(min_length=1)


class DryRunBody(BaseModel):
    """Dry-run the rules on a past job's stored object (header only)."""

    job_id: str = Field(min_length=1, max_length=64)
    candidate: RuleBody | None = Field(  # type: ignore[valid-type]
        None, description="an unsaved rule to evaluate in place of the stored one")


# -- reading and validating ------------------------------------------------------------------


def rule_items(router: RouterPort) -> list[dict[str, Any]]:
    """Every rule in evaluation order (priority, name) with its id, version and origin."""
    rules = router.admin.snapshot().rules
    declared = [str(r.get("name")) for r in router.settings.rules]
    ours = declared_by_config(router.view_db("audit"), "rule",
                              [r.spec.name for r in rules], declared)
    detached = router.admin.snapshot().detached_rules
    return [{**r.spec.to_dict(), "rule_id": r.rule_id, "version": r.version,
             "position": i + 1, "from_config": r.spec.name in ours,
             "detached": r.spec.name in detached,
             "managed_by_file": r.spec.name in ours and r.spec.name not in detached}
            for i, r in enumerate(rules)]


def find_rule(router: RouterPort, name: str) -> VersionedRule | None:
    return next((r for r in router.admin.snapshot().rules if r.spec.name == name), None)


def validate_rule(router: RouterPort, data: Mapping[str, Any]) -> RuleSpec:
    """The parsed rule, or ApiError 422 with field errors (destinations must exist)."""
    try:
        spec = parse_rule(data)
    except RuleError as exc:
        raise ApiError(422, str(exc), {key or "rule": problem
                                       for key, problem in exc.errors.items()}) from None
    known = router.admin.snapshot().live_destinations()
    missing = [d for d in spec.destinations if d not in known]
    if missing:
        raise ApiError(422, f"unknown destination(s): {', '.join(missing)}",
                       {"destinations": "unknown destination(s): " + ", ".join(missing)})
    unknown = [t for t in spec.transforms if t not in router.admin.snapshot().transforms]
    if unknown:
        raise ApiError(422, f"unknown transform(s): {', '.join(unknown)}",
                       {"transforms": "unknown transform(s): " + ", ".join(unknown)})
    return spec


async def save_rule(request: web.Request, data: Mapping[str, Any],
                    existing: str | None) -> RuleSpec:
    """Create (``existing`` None) or replace rule ``existing``; 404, 409 or 422 on error."""
    router = request.app[ROUTER_KEY]
    if existing is not None and find_rule(router, existing) is None:
        raise ApiError(404, f"rule {existing!r} does not exist")
    if existing is not None:
        await asyncio.to_thread(refuse_if_managed, router, "rule", existing)
    spec = validate_rule(router, data)
    if existing is None and find_rule(router, spec.name) is not None:
        raise ApiError(409, f"rule {spec.name!r} already exists", {"name": "already exists"})
    if existing is not None and spec.name != existing:
        raise ApiError(422, "a rule cannot be renamed", {"name": "does not match the rule"})
    await run_command(router.commands.put_rule, spec.to_dict(), actor_of(request))
    return spec


def reorder(router: RouterPort, names: Sequence[str], actor: Any) -> None:
    """Give the rules priorities 10, 20, 30... in the order of ``names`` (all rules)."""
    rules = {r.spec.name: r.spec for r in router.admin.snapshot().rules}
    for position, name in enumerate(names, start=1):
        if name in rules and rules[name].priority != position * 10:
            refuse_if_managed(router, "rule", name)
    missing = [n for n in rules if n not in names]
    unknown = [n for n in names if n not in rules]
    if unknown or missing or len(set(names)) != len(names):
        problem = ("unknown rule(s): " + ", ".join(unknown) if unknown else
                   "every rule must be listed once; missing: " + ", ".join(missing)
                   if missing else "a rule is listed twice")
        raise ApiError(422, problem, {"names": problem})
    for position, name in enumerate(names, start=1):
        data = {**rules[name].to_dict(), "priority": position * 10}
        router.commands.put_rule(data, actor)


def candidate_spec(router: RouterPort, data: Mapping[str, Any] | None) -> RuleSpec | None:
    """An unsaved rule for a dry run (its destinations need not exist yet)."""
    if data is None:
        return None
    try:
        return parse_rule(data)
    except RuleError as exc:
        fields = {f"candidate.{k}" if k else "candidate": v for k, v in exc.errors.items()}
        raise ApiError(422, str(exc), fields) from None


def evaluate_dry(router: RouterPort, item: RoutingInput,
                 candidate: RuleSpec | None) -> dict[str, Any]:
    rules: Sequence[VersionedRule] = router.admin.snapshot().rules
    if candidate is not None:
        rules = with_candidate(rules, candidate)
    result = dry_run(rules, item, router.settings.dispatch.default_destination)
    return result.to_dict()


async def dry_run_job(request: web.Request, job_id: str,
                      candidate: RuleSpec | None) -> dict[str, Any]:
    """Dry-run a past job; the access (the header's values are PHI) is recorded."""
    router = request.app[ROUTER_KEY]
    try:
        job: JobInput = await asyncio.to_thread(job_input, router.view_db("jobs"),
                                                router.blobs, job_id)
    except JobNotFound as exc:
        await record_access(request, AccessRecord("job.dry_run", "job", job_id[:64],
                                                  outcome="not_found"))
        raise ApiError(404, str(exc)) from None
    except DryRunError as exc:
        raise ApiError(422, str(exc)) from None
    await record_access(request, AccessRecord(
        "job.dry_run", "job", job.job_id, study_instance_uid=job.study_instance_uid,
        patient_id=job.patient_id))
    result = await asyncio.to_thread(evaluate_dry, router, job.item, candidate)
    item = job.item
    return {"input": {"job_id": job.job_id, "received_at": job.received_at,
                      "calling_aet": item.calling_aet, "called_aet": item.called_aet,
                      "source_ip": item.source_ip, "recorded_routing": job.routing,
                      "recorded_destinations": list(job.destinations)}, **result}


async def dry_run_upload(request: web.Request, stream: Any, calling_aet: str, called_aet: str,
                         source_ip: str, candidate: RuleSpec | None) -> dict[str, Any]:
    router = request.app[ROUTER_KEY]
    try:
        header = await asyncio.to_thread(header_of_upload, stream, router.blobs.spool_dir)
    except DryRunError as exc:
        raise ApiError(422, str(exc), {"file": str(exc)}) from None
    item = upload_input(header, calling_aet, called_aet or router.settings.ae_title, source_ip)
    result = await asyncio.to_thread(evaluate_dry, router, item, candidate)
    return {"input": {"file": True, "calling_aet": item.calling_aet,
                      "called_aet": item.called_aet, "source_ip": item.source_ip}, **result}


# -- handlers --------------------------------------------------------------------------------


async def list_rules(request: web.Request) -> web.Response:
    items = await asyncio.to_thread(rule_items, request.app[ROUTER_KEY])
    return json_response({"items": items})


async def get_rule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    items = await asyncio.to_thread(rule_items, request.app[ROUTER_KEY])
    found = next((item for item in items if item["name"] == name), None)
    if found is None:
        raise ApiError(404, f"rule {name!r} does not exist")
    return json_response(found)


async def _answer(request: web.Request, name: str, status: int = 200) -> web.Response:
    items = await asyncio.to_thread(rule_items, request.app[ROUTER_KEY])
    return json_response(next(i for i in items if i["name"] == name), status=status)


async def create_rule(request: web.Request) -> web.Response:
    data = (await read_json(request, RawObject)).root
    spec = await save_rule(request, data, existing=None)
    return await _answer(request, spec.name, status=201)


async def update_rule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = (await read_json(request, RawObject)).root
    spec = await save_rule(request, {"name": name, **data}, existing=name)
    return await _answer(request, spec.name)


async def delete_rule(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    await asyncio.to_thread(refuse_if_managed, router, "rule", name)
    await run_command(router.commands.delete_rule, name, actor_of(request))
    return json_response({"deleted": name})


async def reorder_rules(request: web.Request) -> web.Response:
    body = await read_json(request, ReorderBody)
    router = request.app[ROUTER_KEY]
    await run_command(reorder, router, body.names, actor_of(request))
    return await list_rules(request)


async def dry_run_json(request: web.Request) -> web.Response:
    raw = (await read_json(request, RawObject)).root
    body = validate(DryRunBody, {**raw, "candidate": None})  # candidate: domain parser
    candidate = candidate_spec(request.app[ROUTER_KEY], raw.get("candidate"))
    return json_response(await dry_run_job(request, body.job_id, candidate))


async def dry_run_file(request: web.Request) -> web.Response:
    form = await request.post()
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise ApiError(422, "upload a DICOM file in the form field 'file'",
                       {"file": "required"})
    candidate = None
    if isinstance(form.get("candidate"), str) and str(form["candidate"]).strip():
        try:
            raw = orjson.loads(str(form["candidate"]))
        except orjson.JSONDecodeError:
            raise ApiError(422, "candidate is not JSON", {"candidate": "not JSON"}) from None
        if not isinstance(raw, dict):
            raise ApiError(422, "candidate must be an object", {"candidate": "not an object"})
        candidate = candidate_spec(request.app[ROUTER_KEY], raw)
    texts = {k: str(form.get(k, ""))[:64] for k in ("calling_aet", "called_aet", "source_ip")}
    return json_response(await dry_run_upload(request, upload.file, texts["calling_aet"],
                                              texts["called_aet"], texts["source_ip"],
                                              candidate))


BASE = "/api/v1/rules"
TAGS = ("rules",)
ROUTES = [
    Route("GET", BASE, list_rules, "rules.read", "Rules in evaluation order", tags=TAGS),
    Route("POST", BASE, create_rule, "rules.write", "Create a rule", body=RuleBody, tags=TAGS),
    Route("POST", BASE + "/reorder", reorder_rules, "rules.write",
          "Set the evaluation order (priorities 10, 20, 30...)", body=ReorderBody, tags=TAGS),
    Route("POST", BASE + "/dry-run", dry_run_json, "rules.read",
          "Which rules match a past job, condition by condition", body=DryRunBody, tags=TAGS),
    Route("POST", BASE + "/dry-run/file", dry_run_file, "rules.read",
          "Which rules match an uploaded DICOM file (multipart/form-data: file, calling_aet,"
          " called_aet, source_ip, candidate as JSON)", tags=TAGS),
    Route("GET", BASE + "/{name}", get_rule, "rules.read", "One rule", tags=TAGS),
    Route("PUT", BASE + "/{name}", update_rule, "rules.write", "Replace a rule",
          body=RuleBody, tags=TAGS),
    Route("DELETE", BASE + "/{name}", delete_rule, "rules.write", "Delete a rule", tags=TAGS),
]
