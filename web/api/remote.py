"""REST API for query/retrieve against remote nodes under ``/api/v1/remote-nodes``: CRUD of the
nodes (remote.write), C-ECHO, C-FIND at study or series level, C-MOVE/C-GET retrieve jobs and
their progress (remote.read). Queries, retrieves and job lists are recorded as accesses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.application.commands import CommandError, NotFoundError
from router.application.remote_nodes import RemoteNodeConfig, RemoteNodeError, RemoteNodeState
from router.application.retrieve import FindRequest, RemoteError
from router.application.sessions import AccessRecord
from web.api.common import ApiError, RawObject, config_body_model, json_response, read_json
from web.api.file_managed import DetachRequest, managed_message
from web.auth import actor_of, record_access
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

T = TypeVar("T")
TAGS = ("remote",)
BASE = "/api/v1/remote-nodes"
JOBS = "/api/v1/remote-retrieves"
_UID = r"^[0-9]+(\.[0-9]+)*$"
_TEXT = r"^[^\\]*$"  # a backslash would split a DICOM value in two
_DATE = r"^(\d{8}|\d{4}-\d{2}-\d{2})?$"


# -- bodies ----------------------------------------------------------------------------------


# The OpenAPI document's model of a node: RemoteNodeConfig's own annotations. Bodies are
# validated by parse_remote_node, as the TOML file's [[remote_nodes]] are, so a bad field gets
# the same message from both; an API body without "services" gets none (least privilege).
RemoteNodeBody = config_body_model(
    "RemoteNode", RemoteNodeConfig, {"services": (
        tuple[Literal["find", "move", "get"], ...],
        Field((), description="what it may ask of us (C-FIND, C-MOVE, C-GET); none unless "
              "listed (least privilege)"))},
    optional=frozenset({"name"}))


def _node_body(data: dict[str, Any]) -> dict[str, Any]:
    """An API body as the parser takes it: no services unless listed (the file's default is
    all three, for nodes declared before services existed)."""
    return {"services": [], **data}


class FindBody(BaseModel):
    """C-FIND keys; empty ones match anything. Names and IDs take * and ? wildcards."""

    model_config = ConfigDict(extra="forbid")
    level: Literal["STUDY", "SERIES"] = "STUDY"
    patient_name: str = Field("", max_length=64, pattern=_TEXT)
    patient_id: str = Field("", max_length=64, pattern=_TEXT)
    study_date_from: str = Field("", pattern=_DATE, description="YYYYMMDD or YYYY-MM-DD")
    study_date_to: str = Field("", pattern=_DATE)
    modality: str = Field("", max_length=16, pattern=_TEXT)
    accession_number: str = Field("", max_length=16, pattern=_TEXT)
    description: str = Field("", max_length=64, pattern=_TEXT)
    study_instance_uid: str = Field("", max_length=64, pattern=r"^([0-9]+(\.[0-9]+)*)?$",
                                    description="required at SERIES level")

    def request(self) -> FindRequest:
        return FindRequest(
            level=self.level, patient_name=self.patient_name.strip(),
            patient_id=self.patient_id.strip(),
            study_date_from=self.study_date_from.replace("-", ""),
            study_date_to=self.study_date_to.replace("-", ""),
            modality=self.modality.strip().upper(),
            accession_number=self.accession_number.strip(),
            description=self.description.strip(),
            study_instance_uid=self.study_instance_uid)


class RetrieveBody(BaseModel):
    """What to retrieve: a study, or one series of it."""

    model_config = ConfigDict(extra="forbid")
    study_instance_uid: str = Field(max_length=64, pattern=_UID)
    series_instance_uid: str | None = Field(None, max_length=64, pattern=_UID)


# -- shared with the pages -------------------------------------------------------------------


async def call(func: Callable[..., T], *args: Any) -> T:
    """Run a remote-node command in a thread; its errors become API errors."""
    try:
        return await asyncio.to_thread(func, *args)
    except NotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except RemoteNodeError as exc:
        raise ApiError(422, "invalid remote node", fields=exc.errors) from None
    except RemoteError as exc:
        raise ApiError(502, str(exc)) from None
    except CommandError as exc:
        raise ApiError(422, str(exc)) from None


def describe_node(node: RemoteNodeState) -> dict[str, Any]:
    c = node.config
    return {"name": c.name, "ae_title": c.ae_title, "host": c.host, "port": c.port,
            "services": list(c.services), "description": c.description,
            "version": node.version, "from_config": node.created_by == "config",
            "detached": node.detached,
            "managed_by_file": node.created_by == "config" and not node.detached}


def refuse_if_managed(node: RemoteNodeState) -> None:
    if node.created_by == "config" and not node.detached:
        raise ApiError(409, managed_message("remote node", node.name),
                       {"name": "managed by the configuration file"})


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def describe_job(router: RouterPort, job: Any) -> dict[str, Any]:
    target = router.retriever.target_of(job)
    counts = job.counts
    return {"id": job.id, "node": job.node, "method": job.method, "level": job.level,
            "study_instance_uid": target.get("study"),
            "series_instance_uid": target.get("series"), "user": job.user,
            "status": job.status, "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0), "warning": counts.get("warning", 0),
            "remaining": counts.get("remaining", -1), "reason": job.reason,
            "dimse_status": None if job.dimse_status is None else f"0x{job.dimse_status:04X}",
            "requested_at": _iso(job.requested_at), "updated_at": _iso(job.updated_at)}


def node_or_404(request: web.Request, name: str) -> RemoteNodeState:
    node = request.app[ROUTER_KEY].remote_nodes.state.node(name)
    if node is None:
        raise ApiError(404, f"remote node {name!r} does not exist")
    return node


async def save_node(request: web.Request, data: dict[str, Any], create: bool) -> bool:
    """Create or replace a node (409 when creating an existing name); False if unchanged."""
    router = request.app[ROUTER_KEY]
    if create and router.remote_nodes.state.node(str(data.get("name"))) is not None:
        raise ApiError(409, f"remote node {data.get('name')!r} already exists",
                       {"name": "already exists"})
    if not create:
        node = router.remote_nodes.state.node(str(data.get("name")))
        if node is not None:
            refuse_if_managed(node)
    return await call(router.remote_nodes.put, data, actor_of(request))


async def start_retrieve(request: web.Request, name: str, method: str,
                         body: RetrieveBody) -> dict[str, Any]:
    router = request.app[ROUTER_KEY]
    job_id = await call(router.retriever.retrieve, name, method, body.study_instance_uid,
                        body.series_instance_uid, actor_of(request))
    return describe_job(router, router.remote_nodes.state.retrieve(job_id))


async def list_jobs(request: web.Request, node: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:
    """Recent retrieve jobs (recorded as an access: they name studies)."""
    router = request.app[ROUTER_KEY]
    jobs = [describe_job(router, j) for j in router.remote_nodes.state.retrieves(node, limit)]
    await record_access(request, AccessRecord(
        action="remote.retrieves", object_type="remote_node", object_id=node or "",
        detail=f"jobs={len(jobs)}"))
    return jobs


# -- handlers --------------------------------------------------------------------------------


async def list_nodes(request: web.Request) -> web.Response:
    nodes = request.app[ROUTER_KEY].remote_nodes.state.nodes()
    return json_response({"items": [describe_node(nodes[n]) for n in sorted(nodes)]})


async def get_node(request: web.Request) -> web.Response:
    return json_response(describe_node(node_or_404(request, request.match_info["name"])))


async def create_node(request: web.Request) -> web.Response:
    data = _node_body((await read_json(request, RawObject)).root)
    if not data.get("name"):
        raise ApiError(422, "invalid remote node", {"name": "required"})
    await save_node(request, data, create=True)
    return json_response(describe_node(node_or_404(request, str(data["name"]))), 201)


async def update_node(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    node_or_404(request, name)
    data = _node_body((await read_json(request, RawObject)).root)
    if data.get("name") not in (None, name):
        raise ApiError(422, "invalid remote node", {"name": "cannot be changed; create a new one"})
    await save_node(request, {**data, "name": name}, create=False)
    return json_response(describe_node(node_or_404(request, name)))


async def delete_node(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    refuse_if_managed(node_or_404(request, request.match_info["name"]))
    await call(router.remote_nodes.delete, request.match_info["name"], actor_of(request))
    return web.Response(status=204)


async def detach_node(request: web.Request) -> web.Response:
    body = DetachRequest(reason="")
    if request.can_read_body:
        body = await read_json(request, DetachRequest)
    name = request.match_info["name"]
    changed = await call(request.app[ROUTER_KEY].remote_nodes.detach, name, actor_of(request),
                         body.reason)
    return json_response({"name": name, "detached": True, "changed": changed})


async def echo(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    node_or_404(request, name)
    try:
        detail = await asyncio.to_thread(router.retriever.echo, name)
    except RemoteError as exc:
        return json_response({"ok": False, "detail": str(exc)})
    return json_response({"ok": True, "detail": detail})


async def find(request: web.Request) -> web.Response:
    body = await read_json(request, FindBody)
    router = request.app[ROUTER_KEY]
    result = await call(router.retriever.find, request.match_info["name"], body.request(),
                        actor_of(request))
    return json_response({"level": body.level, "truncated": result.truncated,
                          "results": result.rows})


async def move(request: web.Request) -> web.Response:
    body = await read_json(request, RetrieveBody)
    return json_response(await start_retrieve(request, request.match_info["name"], "move",
                                              body), 202)


async def get(request: web.Request) -> web.Response:
    body = await read_json(request, RetrieveBody)
    return json_response(await start_retrieve(request, request.match_info["name"], "get",
                                              body), 202)


async def node_jobs(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    node_or_404(request, name)
    return json_response({"items": await list_jobs(request, name)})


async def all_jobs(request: web.Request) -> web.Response:
    return json_response({"items": await list_jobs(request)})


async def one_job(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    job = router.remote_nodes.state.retrieve(request.match_info["job_id"])
    if job is None:
        raise ApiError(404, "no retrieve with this id")
    shown = describe_job(router, job)
    await record_access(request, AccessRecord(
        action="remote.retrieve.view", object_type="study",
        object_id=str(shown["study_instance_uid"]),
        study_instance_uid=shown["study_instance_uid"], detail=f"job={job.id}"))
    return json_response(shown)


ROUTES: list[Route] = [
    Route("GET", BASE, list_nodes, "remote.read", "Remote DICOM nodes", tags=TAGS),
    Route("POST", BASE, create_node, "remote.write", "Create a remote node",
          body=RemoteNodeBody, tags=TAGS),
    Route("GET", BASE + "/{name}", get_node, "remote.read", "One remote node", tags=TAGS),
    Route("PUT", BASE + "/{name}", update_node, "remote.write", "Replace a remote node",
          body=RemoteNodeBody, tags=TAGS),
    Route("DELETE", BASE + "/{name}", delete_node, "remote.write", "Delete a remote node",
          tags=TAGS),
    Route("POST", BASE + "/{name}/detach", detach_node, "remote.write",
          "Detach a remote node from the configuration file so that it can be edited here"
          " (the file then neither overwrites nor deletes it; recorded with the reason)",
          body=DetachRequest, tags=TAGS),
    Route("POST", BASE + "/{name}/echo", echo, "remote.read", "C-ECHO the node", tags=TAGS),
    Route("POST", BASE + "/{name}/find", find, "remote.read",
          "C-FIND the node (Study Root, study or series level)", body=FindBody, tags=TAGS),
    Route("POST", BASE + "/{name}/move", move, "remote.read",
          "Retrieve a study or series by C-MOVE to the router (a job)", body=RetrieveBody,
          tags=TAGS),
    Route("POST", BASE + "/{name}/get", get, "remote.read",
          "Retrieve a study or series by C-GET (a job)", body=RetrieveBody, tags=TAGS),
    Route("GET", BASE + "/{name}/retrieves", node_jobs, "remote.read",
          "Recent retrieve jobs from this node", tags=TAGS),
    Route("GET", JOBS, all_jobs, "remote.read", "Recent retrieve jobs", tags=TAGS),
    Route("GET", JOBS + "/{job_id}", one_job, "remote.read", "One retrieve job and its progress",
          tags=TAGS),
]
