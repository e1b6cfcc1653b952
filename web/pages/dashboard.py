"""The dashboard (``/dashboard``, and ``/`` for admins and operators): throughput over the
last hour, queues, failures and destination health, refreshed by HTMX polling
``/dashboard/live`` every few seconds. No PHI is shown. ``/`` is each role's landing page: a
radiologist lands on Studies, an auditor on the audit trail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from projections.ai_requests_queries import turnaround
from projections.transfers_queries import recent_activity
from web.api.stats import read_stats
from web.auth import current_user
from web.keys import ROUTER_KEY
from web.pages.jobs import HELPERS
from web.render import render
from web.routes import Route

CHART_WIDTH = 600
CHART_HEIGHT = 120
POLL_SECONDS = 5
AI_WINDOW = 24 * 3600.0  # AI turnaround times over the last day
# Where a role's daily work starts (after login and at ``/``); others get the dashboard.
LANDING = {"radiologist": "/studies", "auditor": "/audit"}
RECENT_TRANSFERS = 8  # latest transfers (study and sender) under "Recent activity"


def chart(minutes: list[dict[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the per-minute chart (SVG attributes, no inline styles: the CSP
    forbids them): two bars per minute, scaled to the busiest minute."""
    slot = CHART_WIDTH / max(1, len(minutes))
    peak = max([1] + [max(m["received"], m["delivered"]) for m in minutes])
    bars = []
    for i, minute in enumerate(minutes):
        for j, key in enumerate(("received", "delivered")):
            height = round(minute[key] / peak * (CHART_HEIGHT - 4), 1)
            bars.append({"kind": key, "x": round(i * slot + 1 + j * slot / 2.5, 1),
                         "y": round(CHART_HEIGHT - height, 1), "width": round(slot / 2.5, 1),
                         "height": height, "count": minute[key], "at": minute["start_at"]})
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "peak": peak, "bars": bars}


async def stats_values(request: web.Request) -> dict[str, Any]:
    stats = await read_stats(request)
    jobs_db = request.app[ROUTER_KEY].view_db("jobs")
    ai = await asyncio.to_thread(turnaround, jobs_db, time.time() - AI_WINDOW)
    recent = await asyncio.to_thread(recent_activity, jobs_db, RECENT_TRANSFERS)
    return {"stats": stats, "chart": chart(stats["throughput"]["minutes"]),
            "poll_seconds": POLL_SECONDS, "ai_turnaround": ai, "recent_transfers": recent,
            **HELPERS}


async def dashboard(request: web.Request) -> web.Response:
    return render(request, "dashboard.html", **await stats_values(request))


async def landing(request: web.Request) -> web.Response:
    """``/``: the page the user's role works from (the login form sends users here)."""
    target = LANDING.get(current_user(request).role)
    if target is not None:
        raise web.HTTPFound(target)
    return await dashboard(request)


async def live(request: web.Request) -> web.Response:
    return render(request, "_dashboard_stats.html", **await stats_values(request))


ROUTES = [
    Route("GET", "/", landing, "dashboard", "Landing page: Studies for a radiologist, the"
          " audit trail for an auditor, else the dashboard"),
    Route("GET", "/dashboard", dashboard, "dashboard", "Dashboard"),
    Route("GET", "/dashboard/live", live, "dashboard", "Dashboard figures (HTMX fragment)"),
]
