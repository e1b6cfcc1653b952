"""Tokens for scripts: ``POST /api/v1/auth/token`` trades a user name and password for a
short-lived bearer session; ``/auth/me`` says who a token belongs to; ``/auth/logout`` ends it.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from pydantic import BaseModel, Field

from router.application.commands import Actor
from router.application.users import LoginRefused
from web.api.common import ApiError, json_response, read_json
from web.auth import actor_of, current_user
from web.keys import ISSUER_KEY, ROUTER_KEY
from web.routes import Route
from web.security import AUTHENTICATED, PUBLIC


class TokenRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1024)


async def issue_token(request: web.Request) -> web.Response:
    body = await read_json(request, TokenRequest)
    router = request.app[ROUTER_KEY]
    source_ip = request.remote or ""
    try:
        user = await asyncio.to_thread(router.users.authenticate, body.username, body.password,
                                       source_ip)
    except LoginRefused as exc:
        if exc.reason.startswith("locked"):
            raise ApiError(429, "too many failed attempts; try again later") from None
        raise ApiError(401, "wrong user name or password") from None
    lifetime = router.settings.web.api_token_lifetime
    actor = Actor(user.name, source_ip, actor_of(request).correlation_id)
    jti = await asyncio.to_thread(router.sessions.start, actor, "bearer", time.time() + lifetime)
    token = request.app[ISSUER_KEY].issue(user.name, jti, "bearer", user.credentials_tag,
                                          lifetime=lifetime)
    return json_response({"access_token": token, "token_type": "bearer",
                          "expires_in": int(lifetime)})


async def me(request: web.Request) -> web.Response:
    principal = current_user(request)
    return json_response({"username": principal.name, "role": principal.role,
                          "authenticated_by": principal.via})


async def end_session(request: web.Request) -> web.Response:
    principal = current_user(request)
    if principal.jti is None:
        raise ApiError(400, "an API token is revoked under /api/v1/users/{name}/tokens, "
                            "not logged out")
    router = request.app[ROUTER_KEY]
    await asyncio.to_thread(router.sessions.end, principal.jti, actor_of(request))
    return json_response({"ended": True})


ROUTES = [
    Route("POST", "/api/v1/auth/token", issue_token, PUBLIC,
          "Trade a user name and password for a short-lived bearer token", body=TokenRequest,
          tags=("auth",)),
    Route("GET", "/api/v1/auth/me", me, AUTHENTICATED, "Who this token belongs to",
          tags=("auth",)),
    Route("POST", "/api/v1/auth/logout", end_session, AUTHENTICATED,
          "End this bearer session", tags=("auth",)),
]
