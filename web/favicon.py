"""The site icon: ``/favicon.ico`` (browsers ask for it on every page, whatever the page
links) and the SVG that base.html links, both committed in web/static; no external fetch.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from web.routes import Route
from web.security import PUBLIC

STATIC = Path(__file__).parent / "static"
ICO = STATIC / "favicon.ico"
MAX_AGE = 86400  # a day: the icon changes with a release, not between requests


async def favicon(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(ICO, headers={"Content-Type": "image/x-icon",
                                          "Cache-Control": f"public, max-age={MAX_AGE}"})


ROUTES = [Route("GET", "/favicon.ico", favicon, PUBLIC, "The site icon")]
