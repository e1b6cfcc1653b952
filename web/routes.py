"""The URL table of the web application: every route with the one permission it needs.

Feature modules (web/api/*.py, web/pages/*.py) each export ``ROUTES``; this module collects
them, registers them and remembers each route's permission for the auth middleware. A route
that is not in the table is never reachable; a route in the table without a known permission
fails at start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from aiohttp import web

from web.security import PERMISSIONS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PERMISSIONS_KEY = web.AppKey("route_permissions", dict)
TABLE_KEY = web.AppKey("route_table", list)


@dataclass(frozen=True)
class Route:
    """One URL: method, path, handler, the permission it needs, and its API documentation."""

    method: str
    path: str
    handler: Handler
    permission: str
    summary: str = ""
    body: Any = None  # a pydantic model for JSON request bodies (OpenAPI + validation)
    body_optional: bool = False  # the handler also takes no body at all (its defaults)
    response: Any = None  # a model (model_json_schema) of the JSON answer, for OpenAPI
    query: tuple[str, ...] = ()  # documented query parameters
    tags: tuple[str, ...] = field(default=())


# Modules that export ROUTES, in registration order.
ROUTE_MODULES = (
    "web.health", "web.favicon", "web.pages.auth", "web.pages.dashboard", "web.pages.transfers",
    "web.pages.jobs", "web.pages.rules", "web.pages.destinations", "web.pages.studies",
    "web.pages.instances", "web.pages.downloads", "web.pages.uploads", "web.pages.audit",
    "web.pages.access_report",
    "web.pages.users",
    "web.pages.settings", "web.pages.storage", "web.api.auth", "web.api.jobs",
    "web.api.transfers", "web.api.rules",
    "web.api.destinations", "web.api.studies", "web.api.audit", "web.api.access_report",
    "web.api.users",
    "web.api.settings", "web.api.storage", "web.api.stats", "web.api.openapi",
    "web.dicomweb.qido", "web.dicomweb.wado", "web.dicomweb.wado_uri", "web.dicomweb.stow",
    "web.viewer", "web.pages.remote", "web.api.remote", "web.api.ai",
    "web.pages.ai", "web.api.deliveries", "web.pages.jobs_bulk", "web.api.send",
    "web.api.file_managed",
    "web.api.transforms", "web.pages.transforms", "web.pages.transform_edit",
)


def all_routes() -> list[Route]:
    return [route for name in ROUTE_MODULES for route in import_module(name).ROUTES]


def setup_routes(app: web.Application, routes: list[Route] | None = None) -> None:
    routes = all_routes() if routes is None else routes
    permissions: dict[Any, str] = {}
    for route in routes:
        if route.permission not in PERMISSIONS:
            raise ValueError(
                f"{route.method} {route.path}: unknown permission {route.permission!r}"
            )
        registered = app.router.add_route(route.method, route.path, route.handler)
        permissions[registered] = route.permission
    app[PERMISSIONS_KEY] = permissions
    app[TABLE_KEY] = routes
