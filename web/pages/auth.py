"""Log in and log out (browser sessions)."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time

from aiohttp import web

from router.application.commands import Actor
from router.application.users import LoginRefused
from web.auth import actor_of, current_user, set_session_cookie
from web.keys import ISSUER_KEY, PRINCIPAL, ROUTER_KEY
from web.render import render
from web.routes import Route
from web.security import AUTHENTICATED, COOKIE_NAME, PUBLIC

LOGIN_CSRF_COOKIE = "dr_login_csrf"
GENERIC_REFUSAL = "Wrong user name or password."


def safe_next(value: str | None) -> str:
    """Only a local path: never redirect a user who just logged in to another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


async def login_form(request: web.Request, error: str = "", username: str = "",
                     status: int = 200, next_path: str | None = None) -> web.Response:
    token = secrets.token_urlsafe(24)
    target = safe_next(next_path if next_path is not None else request.query.get("next"))
    response = render(request, "login.html", status=status, error=error, username=username,
                      login_csrf=token, next_path=target)
    # Secure as the session cookie is: behind a TLS proxy the request itself is plain HTTP.
    secure = request.app[ROUTER_KEY].settings.web.secure_cookies or request.secure
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict",
                        path="/login", secure=secure)
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    if request.get(PRINCIPAL) is not None:
        raise web.HTTPFound(safe_next(request.query.get("next")))
    return await login_form(request)


async def login_submit(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    username = str(form.get("username", ""))[:200]
    next_path = str(form.get("next", "/"))
    password = str(form.get("password", ""))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    presented = str(form.get("csrf_token", ""))
    if not expected or not hmac.compare_digest(expected, presented):
        return await login_form(request, "The login form expired; please try again.",
                                username, status=403, next_path=next_path)
    router = request.app[ROUTER_KEY]
    source_ip = request.remote or ""
    try:
        user = await asyncio.to_thread(router.users.authenticate, username, password, source_ip)
    except LoginRefused as exc:
        message = ("Too many failed attempts; try again later."
                   if exc.reason.startswith("locked") else GENERIC_REFUSAL)
        return await login_form(request, message, username, status=401, next_path=next_path)
    issuer = request.app[ISSUER_KEY]
    expires = time.time() + issuer.max_age
    actor = Actor(user.name, source_ip, actor_of(request).correlation_id)
    jti = await asyncio.to_thread(router.sessions.start, actor, "cookie", expires)
    token = issuer.issue(user.name, jti, "cookie", user.credentials_tag)
    response = web.HTTPFound(safe_next(next_path))
    set_session_cookie(request, response, token)
    response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    principal = current_user(request)
    router = request.app[ROUTER_KEY]
    if principal.jti:
        await asyncio.to_thread(router.sessions.end, principal.jti, actor_of(request))
    response = web.HTTPFound("/login")
    response.del_cookie(COOKIE_NAME, path="/")
    raise response


ROUTES = [
    Route("GET", "/login", login_page, PUBLIC, "Login form"),
    Route("POST", "/login", login_submit, PUBLIC, "Log in"),
    Route("POST", "/logout", logout, AUTHENTICATED, "Log out (ends the session)"),
]
