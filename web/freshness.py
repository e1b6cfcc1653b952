"""Read-your-writes in handlers: before reading a view, wait (at most 2 s) until it holds every
write acknowledged before the request (projections/freshness.py). When it still lags, the
answer is made from the view as it is and says so: a ``Warning: 110`` header ("Response is
Stale", RFC 7234) on any answer, and a note on pages.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from web.keys import ROUTER_KEY

VIEW_LAGS: web.RequestKey[list[str]] = web.RequestKey("view_lags")
LAG_WARNING = ('110 dicom-router "Response is Stale: the {views} not applied every'
               ' acknowledged write yet; they will be found shortly"')
LAG_NOTE = ("The router is still indexing what it received in the last moments: this page may"
            " miss some of it. Reload to see it.")


async def fresh(request: web.Request, *views: str, timeout: float | None = None) -> bool:
    """Wait for each of ``views`` to pass the logs' heads as they are now; False (and the
    request marked, see :func:`add_lag_warning`) when one of them still lags after
    ``timeout`` seconds (default: the router's, 2 s) for them all."""
    reads = request.app[ROUTER_KEY].fresh
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (reads.timeout if timeout is None else timeout)
    lagging = [view for view in views
               if not await reads.wait_async(view, max(0.0, deadline - loop.time()))]
    if lagging:
        request[VIEW_LAGS] = [*request.get(VIEW_LAGS, []), *lagging]
    return not lagging


def view_lags(request: web.Request) -> bool:
    return bool(request.get(VIEW_LAGS))


async def add_lag_warning(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer made from a lagging view carries the Warning."""
    lagging = sorted(set(request.get(VIEW_LAGS, [])))
    if lagging:
        views = (f"{lagging[0]} view has" if len(lagging) == 1
                 else f"{', '.join(lagging)} views have")
        response.headers.add("Warning", LAG_WARNING.format(views=views))
