"""Authentication, authorisation and CSRF, as aiohttp middlewares.

A request is authenticated by the session cookie (browsers), by a bearer session token from
``POST /api/v1/auth/token``, or by a personal API token (``Authorization: Bearer drt_...``).
The route's permission (routes.py) is checked against the user's current role; cookie requests
that change state must carry the CSRF token (header ``X-CSRF-Token`` or form field).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any
from urllib.parse import quote

from aiohttp import web

from router.application.commands import Actor
from router.application.sessions import AccessRecord
from web.ai_scope import PREFIX as AI_TOKEN_PREFIX
from web.ai_scope import VIA as AI_VIA
from web.ai_scope import ai_allowed, ai_principal
from web.api.common import ApiError
from web.keys import ISSUER_KEY, PRINCIPAL, ROUTER_KEY
from web.ports import RouterPort
from web.routes import PERMISSIONS_KEY
from web.security import (
    COOKIE_NAME,
    CSRF_FIELD,
    CSRF_HEADER,
    PUBLIC,
    Principal,
    TokenError,
    TokenIssuer,
)

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered 401 (not redirected to the login page) without credentials: scripts and scrapers.
API_PREFIXES = ("/api/", "/dicom-web", "/wado", "/metrics")
REFRESH_AFTER = 60.0  # re-issue the cookie (sliding idle timeout) at most once a minute


def is_api(request: web.Request) -> bool:
    return request.path.startswith(API_PREFIXES)


def current_user(request: web.Request) -> Principal:
    """The authenticated user of a non-public route (the middleware guarantees one)."""
    principal = request.get(PRINCIPAL)
    if principal is None:
        raise web.HTTPUnauthorized()
    return principal


def actor_of(request: web.Request) -> Actor:
    """Who is asking (user or ``anonymous``), from where, under which correlation id."""
    principal: Principal | None = request.get(PRINCIPAL)
    correlation = request.headers.get("X-Request-ID", "")[:64] or str(uuid.uuid4())
    return Actor(principal.name if principal else "anonymous", request.remote or "",
                 correlation)


async def record_access(request: web.Request, record: AccessRecord) -> None:
    """Record an access to PHI or to the audit trail in the access log."""
    router = request.app[ROUTER_KEY]
    await asyncio.to_thread(router.sessions.record, actor_of(request), record)


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    body = {"error": {"status": status, "message": message, **extra}}
    return web.json_response(body, status=status)


def unauthenticated(request: web.Request) -> web.StreamResponse:
    if is_api(request):
        response = _json_error(401, "authentication required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="dicom-router"'
        return response
    target = "/login?next=" + quote(request.path_qs, safe="")
    if request.headers.get("HX-Request"):
        return web.Response(status=401, headers={"HX-Redirect": target})
    raise web.HTTPFound(target)


def forbidden(request: web.Request, message: str) -> web.StreamResponse:
    if is_api(request):
        return _json_error(403, message)
    return web.Response(status=403, text=f"403 Forbidden: {message}",
                        content_type="text/plain")


async def authenticate(request: web.Request) -> Principal | None:
    """The principal behind the request's credentials, or None (never raises)."""
    router = request.app[ROUTER_KEY]
    issuer: TokenIssuer = request.app[ISSUER_KEY]
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        value = header[7:].strip()
        if value.startswith("drt_"):
            user = await asyncio.to_thread(router.users.user_for_api_token, value)
            return Principal(user.name, user.role, "api_token") if user else None
        if value.startswith(AI_TOKEN_PREFIX):  # an AI processor, scoped to one study
            return await ai_principal(router, value)
        return await _session_principal(router, issuer, value, "bearer")
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        return await _session_principal(router, issuer, cookie, "cookie")
    return None


async def _session_principal(router: RouterPort, issuer: TokenIssuer, token: str,
                             kind: str) -> Principal | None:
    try:
        claims = issuer.check(token)
    except TokenError:
        return None
    if claims["kind"] != kind:
        return None
    user = router.users.get(claims["sub"])
    if user is None or user.disabled or claims.get("ctag") != user.credentials_tag:
        return None
    if not await asyncio.to_thread(router.sessions.is_active, claims["jti"]):
        return None
    return Principal(user.name, user.role, kind, claims["jti"], claims)


async def _csrf_presented(request: web.Request) -> str | None:
    value = request.headers.get(CSRF_HEADER)
    if value:
        return value
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        field = form.get(CSRF_FIELD)
        return field if isinstance(field, str) else None
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    permission = request.app[PERMISSIONS_KEY].get(request.match_info.route)
    if permission is None and request.match_info.http_exception is not None:
        return await handler(request)  # 404 / 405: nothing to protect
    request[PRINCIPAL] = principal = await authenticate(request)
    if permission != PUBLIC:
        if permission is None:
            return forbidden(request, "route has no permission")
        if principal is None:
            return unauthenticated(request)
        if not (ai_allowed(request, principal, permission) if principal.via == AI_VIA
                else principal.can(permission)):
            await record_access(request, AccessRecord(
                action="access.denied", object_type="route", object_id=request.path,
                outcome="denied", detail=f"{request.method} needs {permission}"))
            return forbidden(request, f"your role ({principal.role}) may not do this")
    if (principal is not None and principal.via == "cookie"
            and request.method not in SAFE_METHODS):
        issuer: TokenIssuer = request.app[ISSUER_KEY]
        if principal.jti is None or not issuer.csrf_ok(principal.jti,
                                                        await _csrf_presented(request)):
            return forbidden(request, "missing or wrong CSRF token; reload the page")
    response = await handler(request)
    if principal is not None and principal.via == "cookie" and principal.claims:
        _maybe_refresh_cookie(request, principal, response)
    return response


def _maybe_refresh_cookie(request: web.Request, principal: Principal,
                          response: web.StreamResponse) -> None:
    issuer: TokenIssuer = request.app[ISSUER_KEY]
    claims = principal.claims or {}
    issued_for = claims["idle"] - issuer.idle_timeout
    if time.time() - issued_for < REFRESH_AFTER or response.prepared:
        return
    router = request.app[ROUTER_KEY]
    user = router.users.get(principal.name)
    if user is None or principal.jti is None:
        return
    token = issuer.issue(principal.name, principal.jti, "cookie", user.credentials_tag,
                         issued_at=claims["iat"], lifetime=claims["exp"] - claims["iat"])
    set_session_cookie(request, response, token)


def set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    router = request.app[ROUTER_KEY]
    secure = router.settings.web.secure_cookies or request.secure
    response.set_cookie(COOKIE_NAME, token, httponly=True, samesite="Strict", secure=secure,
                        path="/")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """API errors as JSON, never a stack trace; security headers on every answer."""
    try:
        response = await handler(request)
    except ApiError as exc:
        extra = {"fields": exc.fields} if exc.fields else {}
        response = _json_error(exc.status, exc.message, **extra)
    except web.HTTPException as exc:
        if not is_api(request) or exc.status < 400 or exc.content_type == "application/json":
            raise
        response = _json_error(exc.status, exc.text or exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        if is_api(request):
            response = _json_error(500, "internal error; see the router's log")
        else:
            response = web.Response(status=500, text="500: internal error; see the router's log",
                                    content_type="text/plain")
    _security_headers(response)
    return response


def _security_headers(response: web.StreamResponse) -> None:
    if response.prepared:
        return
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    if (response.content_type or "").startswith("text/html"):
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'self'")
