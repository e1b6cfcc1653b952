"""``/api/v1/stats``: throughput over the last hour, queue depth and the oldest waiting
delivery per destination, failures and destination health (no PHI, nothing recorded).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.stats_queries import collect
from web.api.common import json_response
from web.filters import with_iso_times
from web.keys import ROUTER_KEY
from web.routes import Route


async def read_stats(request: web.Request) -> dict[str, Any]:
    """The figures of the dashboard, read from the views (epoch seconds for times)."""
    router = request.app[ROUTER_KEY]

    def read() -> dict[str, Any]:  # the admin snapshot may refresh from the log: a thread
        figures = collect(router.view_db("jobs"), router.view_db("audit"),
                          router.admin.snapshot().destinations)
        figures["nodes"] = router.nodes.nodes()
        return figures

    return await asyncio.to_thread(read)


async def stats(request: web.Request) -> web.Response:
    return json_response(with_iso_times(await read_stats(request)))


ROUTES = [
    Route("GET", "/api/v1/stats", stats, "stats.read",
          "Received and delivered per minute (last hour), queues, failures, destination"
          " health and the router nodes sharing the database", tags=("stats",)),
]
