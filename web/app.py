"""The aiohttp composition root: templates, static files, middlewares (errors, auth, CSRF) and
the URL table of routes.py. Handlers read views and call the write side through the Router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from web.auth import auth_middleware, error_middleware
from web.keys import ISSUER_KEY, ROUTER_KEY
from web.proxies import proxy_middleware
from web.routes import PERMISSIONS_KEY, setup_routes
from web.security import PUBLIC, TokenIssuer

__all__ = ["ROUTER_KEY", "create_app"]

HERE = Path(__file__).parent


def create_app(router: Any) -> web.Application:
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
        app, loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined if getattr(router, "strict_templates", False)
        else jinja2.Undefined)
    setup_routes(app)
    static = app.router.add_static("/static", HERE / "static", append_version=False)
    for route in static:
        app[PERMISSIONS_KEY][route] = PUBLIC
    return app
