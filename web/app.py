"""The aiohttp composition root. Today: /healthz, /readyz and /metrics; the UI, REST API and
DICOMweb register their routes here (see routes.py) and read views only.
"""

from __future__ import annotations

from aiohttp import web

from web.routes import setup_routes

ROUTER_KEY = web.AppKey("router", object)


def create_app(router: object) -> web.Application:
    """Build the web application around a started (or starting) Router."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[ROUTER_KEY] = router
    setup_routes(app)
    return app

