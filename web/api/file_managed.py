"""Rules and destinations the TOML file declares are managed by the file: the file is applied
at every start (and by ``dicom-router apply``), so an edit made here would be undone. Edits
are refused with that explanation until an admin detaches the item from the file
(``POST /api/v1/rules/{name}/detach``, ``.../destinations/{name}/detach``; recorded as
``Rule.Detached`` / ``Destination.Detached`` with the reason), after which the file leaves it
alone.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from projections.destinations_queries import declared_by_config
from web.api.common import ApiError, json_response, read_json, run_command
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

KINDS = ("rule", "destination")


class DetachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500)


def declared(router: RouterPort, kind: str, names: list[str]) -> set[str]:
    """The names among ``names`` the configuration file declares (or declared)."""
    items = router.settings.rules if kind == "rule" else router.settings.destinations
    return declared_by_config(router.view_db("audit"), kind, names,
                              [str(i.get("name")) for i in items])


def is_detached(router: RouterPort, kind: str, name: str) -> bool:
    snapshot = router.admin.snapshot()
    if kind == "rule":
        return name in snapshot.detached_rules
    state = snapshot.destinations.get(name)
    return bool(state is not None and state.detached)


def managed(router: RouterPort, kind: str, name: str) -> bool:
    """Declared by the file and not detached from it: the file decides what it is."""
    return bool(declared(router, kind, [name])) and not is_detached(router, kind, name)


def managed_message(kind: str, name: str) -> str:
    return (f"{kind} {name!r} is managed by the configuration file: a change made here "
            "would be undone when the router next starts (or at the next dicom-router "
            "apply). Change it in the file, or detach it from the file first (then the file "
            "no longer changes it).")


def refuse_if_managed(router: RouterPort, kind: str, name: str) -> None:
    """Blocking (reads the audit view): call from a thread."""
    if managed(router, kind, name):
        raise ApiError(409, managed_message(kind, name), {"name": "managed by the "
                                                          "configuration file"})


async def detach(request: web.Request, kind: str, name: str, reason: str) -> bool:
    router = request.app[ROUTER_KEY]
    return await run_command(router.commands.detach, kind, name, actor_of(request), reason)


async def detach_api(request: web.Request, kind: str) -> web.Response:
    body = DetachRequest(reason="")
    if request.can_read_body:
        body = await read_json(request, DetachRequest)
    name = request.match_info["name"]
    changed = await detach(request, kind, name, body.reason)
    return json_response({"name": name, "detached": True, "changed": changed})


async def detach_rule(request: web.Request) -> web.Response:
    return await detach_api(request, "rule")


async def detach_destination(request: web.Request) -> web.Response:
    return await detach_api(request, "destination")


NOTE = (" From then on the configuration file (at start or dicom-router apply) neither "
        "overwrites nor deletes it; recorded with the reason.")
ROUTES = [
    Route("POST", "/api/v1/rules/{name}/detach", detach_rule, "rules.write",
          "Detach a rule from the configuration file so that it can be edited here." + NOTE,
          body=DetachRequest, tags=("rules",)),
    Route("POST", "/api/v1/destinations/{name}/detach", detach_destination,
          "destinations.write", "Detach a destination from the configuration file so that"
          " it can be edited here." + NOTE, body=DetachRequest, tags=("destinations",)),
]
