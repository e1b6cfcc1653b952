"""The dashboard (placeholder until its owner fills it in this session)."""

from __future__ import annotations

from aiohttp import web

from web.render import render
from web.routes import Route


async def dashboard(request: web.Request) -> web.Response:
    return render(request, "dashboard.html")


ROUTES = [Route("GET", "/", dashboard, "dashboard", "Dashboard")]
