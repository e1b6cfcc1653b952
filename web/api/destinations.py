"""REST API for destinations: CRUD (secrets write-only), test connection, pause/resume, health.

Bodies are validated by the same parser as the TOML file (``parse_destination``), so a bad
field gets the same message everywhere; the pydantic models below document the bodies in the
OpenAPI document and are built from the config classes' annotations (the same types, ranges
and defaults pydantic validates them with), so they cannot drift from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from aiohttp import web
from pydantic import BaseModel, Field, RootModel

from projections.destinations_queries import Health, declared_by_config, health
from router.application.admin_state import DestinationState
from router.dispatch.base import (
    NOT_REACHED,
    NOT_REACHED_MIN_SECONDS,
    DeliveryError,
    RefusedAddressError,
    UnreachableError,
)
from router.dispatch.policy import DestinationPolicy
from router.dispatch.registry import (
    DESTINATION_KINDS,
    DestinationConfigError,
    DestinationKind,
    build_adapter,
    public_config,
)
from web.api.common import (
    ApiError,
    RawObject,
    config_body_model,
    json_response,
    read_json,
    run_command,
)
from web.api.file_managed import refuse_if_managed
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 45.0  # seconds a test connection may take before the page gives up waiting


# -- documentation models --------------------------------------------------------------------


def _body_model(kind: DestinationKind) -> type[BaseModel]:
    # The config class's own annotations: ranges, durations ("30s") and AE titles included.
    return config_body_model(f"{kind.name.capitalize()}Destination", kind.config_class,
                             {"type": (Literal[kind.name], ...)},
                             secret_fields=frozenset(kind.secret_fields))


_MODELS = tuple(_body_model(kind) for kind in DESTINATION_KINDS.values())


class DestinationBody(RootModel[Annotated[Union[_MODELS], Field(discriminator="type")]]):  # type: ignore[valid-type]  # noqa: UP007
    """A destination; secret fields (S3 keys) are write-only: omit them to keep the stored one."""


# -- reading ---------------------------------------------------------------------------------


def live(router: RouterPort) -> dict[str, DestinationState]:
    return dict(router.admin.snapshot().live_destinations())


def describe(state: DestinationState, state_health: Health | None,
             from_config: bool) -> dict[str, Any]:
    """A destination for display: every field of its kind, secrets only as set/unset."""
    kind = DESTINATION_KINDS.get(str(state.config.get("type")))
    secret_fields = kind.secret_fields if kind else frozenset()
    shown = public_config(state.config)
    names = [f.name for f in dataclasses.fields(kind.config_class)] if kind else list(shown)
    config = {key: shown.get(key) for key in names
              if key not in secret_fields and key not in ("name", "type")}
    return {
        "name": state.name, "type": state.config.get("type"), "config": config,
        "secrets": {key: "set" if state.config.get(key) else "unset"
                    for key in sorted(secret_fields)},
        "paused": state.paused, "version": state.version, "from_config": from_config,
        "detached": state.detached, "managed_by_file": from_config and not state.detached,
        "health": (state_health or Health(state.name, state.paused)).to_dict(),
    }


def load_all(router: RouterPort) -> tuple[list[dict[str, Any]], dict[str, Health]]:
    """Every live destination described (name order), and the health of all names that have
    deliveries, including deleted destinations that still have some."""
    states = live(router)
    healths = health(router.view_db("jobs"), {n: s.paused for n, s in states.items()})
    declared = [str(d.get("name")) for d in router.settings.destinations]
    ours = declared_by_config(router.view_db("audit"), "destination", states, declared)
    items = [describe(states[n], healths.get(n), n in ours) for n in sorted(states)]
    return items, healths


def load_one(router: RouterPort, name: str) -> dict[str, Any]:
    state = live(router).get(name)
    if state is None:
        raise ApiError(404, f"destination {name!r} does not exist")
    healths = health(router.view_db("jobs"), {name: state.paused})
    declared = [str(d.get("name")) for d in router.settings.destinations]
    ours = declared_by_config(router.view_db("audit"), "destination", [name], declared)
    return describe(state, healths.get(name), name in ours)


# -- writing ---------------------------------------------------------------------------------


def with_kept_secrets(data: Mapping[str, Any], stored: Mapping[str, Any] | None
                      ) -> dict[str, Any]:
    """``data`` plus the stored (sealed) secrets it omits, when the kind is unchanged."""
    merged = dict(data)
    if stored is None or stored.get("type") != merged.get("type"):
        return merged
    kind = DESTINATION_KINDS.get(str(stored.get("type")))
    for key in kind.secret_fields if kind else ():
        if key not in merged and stored.get(key):
            merged[key] = stored[key]
    return merged


def users_of(router: RouterPort, name: str) -> list[str]:
    """Names of the rules that send to destination ``name``."""
    return [r.spec.name for r in router.admin.snapshot().rules if name in r.spec.destinations]


async def save(request: web.Request, data: dict[str, Any], create: bool) -> dict[str, Any]:
    """Create or replace a destination through the commands (404/409/422 as API errors)."""
    router = request.app[ROUTER_KEY]
    name = data.get("name")
    states = live(router)
    if create and isinstance(name, str) and name in states:
        raise ApiError(409, f"destination {name!r} already exists", {"name": "already exists"})
    if not create and isinstance(name, str):
        await asyncio.to_thread(refuse_if_managed, router, "destination", name)
    stored = None if create or not isinstance(name, str) else states[name].config
    merged = with_kept_secrets(data, stored)
    await run_command(router.commands.put_destination, merged, actor_of(request))
    return await asyncio.to_thread(load_one, router, str(name))


def run_check(stored: Mapping[str, Any], box: Any, calling_ae: str,
              policy: DestinationPolicy) -> dict[str, Any]:
    """Build the adapter and run its check() against the real peer; never raises.

    The adapter holds the connection to the address policy. Whatever kept it from reaching
    the peer (a refused address, an unknown name, a closed port, another protocol) is
    answered with the same words after at least NOT_REACHED_MIN_SECONDS: this button must not
    tell an operator which addresses and ports of the network answer. The log has the reason.
    """
    started = time.monotonic()
    try:
        adapter = build_adapter(stored, box, calling_ae=calling_ae, policy=policy)
    except DestinationConfigError as exc:
        return {"ok": False, "error": str(exc), "fields": exc.errors}
    try:
        detail = adapter.check()
        result: dict[str, Any] = {"ok": True, "detail": detail}
    except (RefusedAddressError, UnreachableError) as exc:
        logger.info("test of destination %s: %s", stored.get("name"), exc)
        time.sleep(max(0.0, started + NOT_REACHED_MIN_SECONDS - time.monotonic()))
        result = {"ok": False, "error": NOT_REACHED}
    except DeliveryError as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception as exc:
        logger.warning("test of a destination failed unexpectedly: %s", type(exc).__name__)
        result = {"ok": False, "error": f"unexpected error: {type(exc).__name__}"}
    finally:
        adapter.close()
    result["duration_ms"] = round(1000 * (time.monotonic() - started))
    return result


async def check(router: RouterPort, stored: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(run_check, stored, router.box, router.settings.ae_title,
                              router.policy),
            CHECK_TIMEOUT)
    except TimeoutError:
        return {"ok": False, "error": NOT_REACHED}


# -- handlers --------------------------------------------------------------------------------


async def list_destinations(request: web.Request) -> web.Response:
    items, _ = await asyncio.to_thread(load_all, request.app[ROUTER_KEY])
    return json_response({"items": items})


async def get_destination(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    return json_response(await asyncio.to_thread(load_one, router, request.match_info["name"]))


async def create_destination(request: web.Request) -> web.Response:
    data = (await read_json(request, RawObject)).root
    return json_response(await save(request, data, create=True), status=201)


async def update_destination(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = (await read_json(request, RawObject)).root
    if "name" in data and data["name"] != name:
        raise ApiError(422, "a destination cannot be renamed",
                       {"name": "does not match the name in the URL"})
    if name not in live(request.app[ROUTER_KEY]):
        raise ApiError(404, f"destination {name!r} does not exist")
    return json_response(await save(request, {**data, "name": name}, create=False))


async def delete_destination(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    if name not in live(router):
        raise ApiError(404, f"destination {name!r} does not exist")
    rules = users_of(router, name)
    if rules:
        raise ApiError(409, f"destination {name!r} is used by rule(s) {', '.join(rules)}; "
                            "remove it from them first")
    await asyncio.to_thread(refuse_if_managed, router, "destination", name)
    await run_command(router.commands.delete_destination, name, actor_of(request))
    return json_response({"deleted": name})


async def set_paused(request: web.Request, paused: bool) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    await run_command(router.commands.pause_destination, name, actor_of(request), paused)
    return json_response(await asyncio.to_thread(load_one, router, name))


async def pause_destination(request: web.Request) -> web.Response:
    return await set_paused(request, True)


async def resume_destination(request: web.Request) -> web.Response:
    return await set_paused(request, False)


async def test_destination(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    name = request.match_info["name"]
    state = live(router).get(name)
    if state is None:
        raise ApiError(404, f"destination {name!r} does not exist")
    return json_response({"name": name, **await check(router, state.config)})


async def destination_health(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    item = await asyncio.to_thread(load_one, router, request.match_info["name"])
    return json_response({"name": item["name"], **item["health"]})


BASE = "/api/v1/destinations"
TAGS = ("destinations",)
ROUTES = [
    Route("GET", BASE, list_destinations, "destinations.read",
          "Destinations with their health and backlog", tags=TAGS),
    Route("POST", BASE, create_destination, "destinations.write", "Create a destination",
          body=DestinationBody, tags=TAGS),
    Route("GET", BASE + "/{name}", get_destination, "destinations.read",
          "One destination (secrets shown as set/unset only)", tags=TAGS),
    Route("PUT", BASE + "/{name}", update_destination, "destinations.write",
          "Replace a destination's settings (omitted secrets are kept)",
          body=DestinationBody, tags=TAGS),
    Route("DELETE", BASE + "/{name}", delete_destination, "destinations.write",
          "Delete a destination (refused while rules send to it)", tags=TAGS),
    Route("POST", BASE + "/{name}/test", test_destination, "destinations.write",
          "Test the connection (C-ECHO, folder probe, S3 HeadBucket)", tags=TAGS),
    Route("POST", BASE + "/{name}/pause", pause_destination, "destinations.write",
          "Pause deliveries (they keep queueing)", tags=TAGS),
    Route("POST", BASE + "/{name}/resume", resume_destination, "destinations.write",
          "Resume deliveries", tags=TAGS),
    Route("GET", BASE + "/{name}/health", destination_health, "destinations.read",
          "Backlog, oldest pending, last success and failure, consecutive failures",
          tags=TAGS),
]
