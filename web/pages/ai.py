"""The AI processors page ``/ai``: each ``ai`` destination with its settings and turnaround,
a signed test ping, and the recent round trips with their result tags. Creating, editing and
deleting use the destinations forms (built from the ``ai`` config dataclass).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from projections.ai_requests_queries import list_requests, turnaround
from router.dispatch.registry import public_config
from web.api.ai import run_ping
from web.keys import ROUTER_KEY
from web.pages.jobs import HELPERS
from web.ports import RouterPort
from web.render import render
from web.routes import Route

RECENT = 50
WINDOW = 24 * 3600.0


def processors(router: RouterPort) -> list[dict[str, Any]]:
    out = []
    for name, state in sorted(router.admin.snapshot().live_destinations().items()):
        if state.config.get("type") != "ai":
            continue
        config = public_config(state.config)
        out.append({"name": name, "host": urlsplit(str(config.get("url", ""))).netloc,
                    "paused": state.paused, **config})
    return out


async def ai_page(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    db = router.view_db("jobs")

    def read() -> dict[str, Any]:
        return {"processors": processors(router),
                "turnaround": {t["destination"]: t for t in turnaround(db, time.time() - WINDOW)},
                "ai_requests": list_requests(db, None, None, RECENT, 0)}

    return render(request, "ai.html", **await asyncio.to_thread(read), **HELPERS)


async def ping(request: web.Request) -> web.Response:
    result = await run_ping(request, request.match_info["name"])
    return render(request, "_ai_ping.html", result=result)


ROUTES = [
    Route("GET", "/ai", ai_page, "destinations.read", "AI processors"),
    Route("POST", "/ai/{name}/ping", ping, "destinations.write",
          "Send a signed test ping to an AI processor (HTMX fragment)"),
]
