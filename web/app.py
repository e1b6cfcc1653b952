"""The aiohttp composition root: templates, static files, middlewares (errors, auth, CSRF) and
the URL table of routes.py. Handlers read views and call the write side through the Router.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp.web_response
import aiohttp_jinja2
import jinja2
from aiohttp import web

from web.auth import auth_middleware, error_middleware
from web.dicom_text import FILTERS
from web.freshness import add_lag_warning
from web.health import METRICS_PATH
from web.keys import ISSUER_KEY, ROUTER_KEY
from web.ports import RouterPort
from web.proxies import proxy_middleware
from web.routes import PERMISSIONS_KEY, setup_routes
from web.security import PUBLIC, TokenIssuer

__all__ = ["ROUTER_KEY", "create_app"]

HERE = Path(__file__).parent
# The Server header of every answer: aiohttp's default names the Python and aiohttp versions.
SERVER_NAME = "dicom-router"


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer (pages, API, errors, static files) names no software version."""
    response.headers["Server"] = SERVER_NAME


def create_app(router: RouterPort) -> web.Application:
    """Build the web application around a started (or starting) Router."""
    middlewares = [error_middleware, auth_middleware]
    if router.settings.web.trusted_proxies:
        middlewares.insert(0, proxy_middleware(router.settings.web.trusted_proxies))
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[ROUTER_KEY] = router
    web_settings = router.settings.web
    app[ISSUER_KEY] = TokenIssuer(router.box.derive("web/session-tokens"),
                                  web_settings.session_idle_timeout,
                                  web_settings.session_max_age)
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), filters=FILTERS,
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True))
    setup_routes(app)
    static = app.router.add_static("/static", HERE / "static", append_version=False)
    for route in static:
        app[PERMISSIONS_KEY][route] = PUBLIC
    if web_settings.public_metrics:  # a scraper without a token, by the admin's choice
        for route in app.router.routes():
            if route.resource is not None and route.resource.canonical == METRICS_PATH:
                app[PERMISSIONS_KEY][route] = PUBLIC
    app.on_response_prepare.append(_server_header)
    app.on_response_prepare.append(add_lag_warning)
    # Answers to requests that never reach the application (malformed request lines and
    # headers, answered 400 by aiohttp's protocol handler) skip the signal above and take
    # aiohttp's module default instead; aiohttp has no setting for it.
    aiohttp.web_response.SERVER_SOFTWARE = SERVER_NAME
    return app
