"""REST API for transforms: CRUD (recorded as Transform events), a dry run on a stored
instance (an audited access: the header is PHI), and the re-identification lookup (admins
only, every lookup audited).

Bodies are validated by the domain's ``parse_transform`` (the same messages as for the TOML
file), answered 422 with one entry per bad field.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from projections.destinations_queries import declared_by_config
from router.application.reidentification import lookup_record, project_seed
from router.application.sessions import AccessRecord
from router.application.transform_preview import PreviewError, PreviewNotFound, preview
from router.transforms.spec import KINDS, TransformError, parse_transform
from web.api.common import ApiError, RawObject, json_response, read_json, run_command
from web.auth import actor_of, record_access
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route


class TransformBody(BaseModel):
    """A transform: ``kind`` selects the options (docs/transforms.md)."""

    name: str
    kind: Literal[KINDS]  # type: ignore[valid-type]
    description: str = ""
    project: str | None = Field(None, description="deidentify: the project (selects the seed)")
    retain_dates: Literal["shift", "keep"] | None = None
    retain_uids: bool | None = None
    retain_device_identity: bool | None = None
    retain_patient_characteristics: bool | None = None
    retain_institution_identity: bool | None = None
    clean_descriptors: bool | None = None
    retain_private: bool | None = None
    ops: list[dict[str, Any]] | None = Field(
        None, description="morph: [{op: set|copy|delete|replace, tag, value|from|pattern, "
                          "with, vr, when}]")


class PreviewBody(BaseModel):
    """A stored instance and either one transform or a destination's chain."""

    sop_instance_uid: str = Field(min_length=1, max_length=64)
    transform: str = ""
    destination: str = ""


def transform_items(router: RouterPort) -> list[dict[str, Any]]:
    """Every transform with its version, origin and the destinations and rules naming it."""
    transforms = router.admin.snapshot().transforms
    declared = [str(t.get("name")) for t in router.settings.transforms]
    ours = declared_by_config(router.view_db("audit"), "transform", list(transforms), declared)
    return [{**t.spec.to_dict(), "version": t.version, "from_config": name in ours,
             "used_by": router.commands.transform_users(name)}
            for name, t in sorted(transforms.items())]


def validate_transform(data: dict[str, Any]) -> dict[str, Any]:
    try:
        return parse_transform(data).to_dict()
    except TransformError as exc:
        raise ApiError(422, str(exc), exc.errors) from None


async def _answer(request: web.Request, name: str, status: int = 200) -> web.Response:
    items = await asyncio.to_thread(transform_items, request.app[ROUTER_KEY])
    found = next((i for i in items if i["name"] == name), None)
    if found is None:
        raise ApiError(404, f"transform {name!r} does not exist")
    return json_response(found, status=status)


async def list_transforms(request: web.Request) -> web.Response:
    return json_response({"items": await asyncio.to_thread(transform_items,
                                                           request.app[ROUTER_KEY])})


async def get_transform(request: web.Request) -> web.Response:
    return await _answer(request, request.match_info["name"])


async def create_transform(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    spec = validate_transform((await read_json(request, RawObject)).root)
    if spec["name"] in router.admin.snapshot().transforms:
        raise ApiError(409, f"transform {spec['name']!r} already exists",
                       {"name": "already exists"})
    await run_command(router.commands.put_transform, spec, actor_of(request))
    return await _answer(request, spec["name"], status=201)


def from_file(router: RouterPort, name: str) -> bool:
    """Declared by the configuration file's [[transforms]]: applied at every start, so a
    change made in the UI or the API would be undone then (transforms cannot be detached
    from the file; change them there)."""
    return name in {str(t.get("name")) for t in router.settings.transforms}


def refuse_if_from_file(router: RouterPort, name: str) -> None:
    if from_file(router, name):
        raise ApiError(409, f"transform {name!r} is managed by the configuration file: a "
                       "change made here would be undone when the router next starts (or at "
                       "the next dicom-router apply). Change it in the file.",
                       {"name": "managed by the configuration file"})


async def update_transform(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    if name not in router.admin.snapshot().transforms:
        raise ApiError(404, f"transform {name!r} does not exist")
    refuse_if_from_file(router, name)
    data = (await read_json(request, RawObject)).root
    if data.get("name", name) != name:
        raise ApiError(422, "a transform cannot be renamed", {"name": "does not match"})
    spec = validate_transform({**data, "name": name})
    await run_command(router.commands.put_transform, spec, actor_of(request))
    return await _answer(request, name)


async def delete_transform(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    refuse_if_from_file(router, name)
    await run_command(router.commands.delete_transform, name, actor_of(request))
    return json_response({"deleted": name})


async def run_preview(request: web.Request, body: PreviewBody) -> dict[str, Any]:
    """The preview as a dict, the access recorded (found, not found or refused)."""
    router = request.app[ROUTER_KEY]
    try:
        result = await asyncio.to_thread(
            preview, router.view_db("jobs"), router.blobs, router.admin.snapshot(),
            lambda project: project_seed(router.box, project),
            sop_instance_uid=body.sop_instance_uid, transform=body.transform,
            destination=body.destination)
    except PreviewError as exc:
        outcome = "not_found" if isinstance(exc, PreviewNotFound) else "failure"
        await record_access(request, AccessRecord(
            "transform.preview", "instance", body.sop_instance_uid[:64], outcome=outcome,
            detail=str(exc)[:300]))
        status = 404 if isinstance(exc, PreviewNotFound) else 422
        raise ApiError(status, str(exc), {exc.field: str(exc)} if exc.field else None) from None
    chosen = f"transform {body.transform}" if body.transform else (
        f"destination {body.destination}")
    await record_access(request, AccessRecord(
        "transform.preview", "instance", body.sop_instance_uid,
        study_instance_uid=result.study_instance_uid, patient_id=result.patient_id,
        detail=chosen))
    return result.to_dict()


async def preview_json(request: web.Request) -> web.Response:
    return json_response(await run_preview(request, await read_json(request, PreviewBody)))


async def reidentify(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    project, kind, pseudonym = (request.match_info[k] for k in ("project", "kind", "pseudonym"))
    reason = request.query.get("reason", "").strip()[:500]
    if not reason:
        raise ApiError(422, "reason: required: why the pseudonym is re-identified (recorded "
                            "in the audit trail)", {"reason": "required"})
    found: dict[str, str] | None = None
    try:
        found = await run_command(router.reidentification.lookup, project, kind, pseudonym)
    finally:
        await record_access(request, lookup_record(project, kind, pseudonym, found, reason))
    return json_response({"project": project, "kind": kind, "pseudonym": pseudonym, **found})


BASE = "/api/v1/transforms"
TAGS = ("transforms",)
ROUTES = [
    Route("GET", BASE, list_transforms, "transforms.read", "Transforms", tags=TAGS),
    Route("POST", BASE, create_transform, "transforms.write", "Create a transform",
          body=TransformBody, tags=TAGS),
    Route("POST", BASE + "/preview", preview_json, "transforms.preview",
          "Dry run: a stored instance's header before and after a transform or a "
          "destination's chain (nothing sent or stored; recorded as an access)",
          body=PreviewBody, tags=TAGS),
    Route("GET", BASE + "/{name}", get_transform, "transforms.read", "One transform",
          tags=TAGS),
    Route("PUT", BASE + "/{name}", update_transform, "transforms.write", "Replace a transform",
          body=TransformBody, tags=TAGS),
    Route("DELETE", BASE + "/{name}", delete_transform, "transforms.write",
          "Delete a transform (refused while a destination or rule names it)", tags=TAGS),
    Route("GET", "/api/v1/reidentification/{project}/{kind}/{pseudonym}", reidentify,
          "reidentification.lookup", "The originals behind a pseudonym of a de-identification"
          " project (kind: patient or study; query: reason, required); every lookup is"
          " audited with its reason", tags=TAGS),
]
