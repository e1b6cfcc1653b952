"""Rendering pages: the template context every page shares (user, navigation, CSRF token)."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from web.freshness import LAG_NOTE, view_lags
from web.keys import ISSUER_KEY, PRINCIPAL
from web.security import Principal

# (label, path, permission): the navigation bar shows what the user's role may open.
NAVIGATION = (
    ("Dashboard", "/dashboard", "dashboard"),
    ("Jobs", "/jobs", "jobs.read"),
    ("Rules", "/rules", "rules.read"),
    ("Destinations", "/destinations", "destinations.read"),
    ("Transforms", "/transforms", "transforms.read"),
    ("AI", "/ai", "destinations.read"),
    ("Studies", "/studies", "studies.read"),
    ("Remote PACS", "/remote", "remote.read"),
    ("Audit", "/audit", "audit.read"),
    ("Users", "/users", "users.manage"),
    ("Settings", "/settings", "settings.read"),
    ("Storage", "/storage", "storage.manage"),
)


def page_context(request: web.Request, **values: Any) -> dict[str, Any]:
    principal: Principal | None = request.get(PRINCIPAL)
    csrf = ""
    if principal is not None and principal.jti is not None:
        csrf = request.app[ISSUER_KEY].csrf_token(principal.jti)
    nav = [(label, path) for label, path, perm in NAVIGATION
           if principal is not None and principal.can(perm)]
    # ``/`` shows the dashboard to the roles that land there: its tab is the active one.
    path = "/dashboard" if request.path == "/" else request.path
    return {"user": principal, "csrf_token": csrf, "nav": nav, "path": path,
            "view_lag_note": LAG_NOTE if view_lags(request) else "", **values}


def render(request: web.Request, template: str, status: int = 200,
           **values: Any) -> web.Response:
    """Render a page (or an HTMX fragment) with the shared context; autoescaped."""
    return aiohttp_jinja2.render_template(template, request, page_context(request, **values),
                                          status=status)
