"""Every route of the running application, taken from its route table (not a hand list):
refused without a valid session, refused to roles without its permission, and refused
without the CSRF token when a cookie session changes state."""

from __future__ import annotations

import re
import time
from typing import Any

import jwt
import pytest
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD
from tests.web_harness import Browser, bearer
from web.auth import API_PREFIXES
from web.routes import PERMISSIONS_KEY, TABLE_KEY, Route
from web.security import PUBLIC, ROLE_PERMISSIONS, allowed

# The only routes anyone may call without logging in. Adding one is a security decision:
# this test fails until the new route is listed here.
PUBLIC_ALLOWLIST = {
    ("GET", "/healthz"), ("GET", "/readyz"),
    ("GET", "/login"), ("POST", "/login"),
    ("GET", "/favicon.ico"),  # browsers ask for it on every page, the login page included
    ("POST", "/api/v1/auth/token"), ("GET", "/api/v1/openapi.json"),
    # AI processors call back without a session: the route is authenticated by the HMAC
    # signature of the destination's shared secret (wrong ones are 401 and audited).
    ("POST", "/api/v1/ai/callbacks/{correlation_id}"),
}
PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")
PASSWORD = "a long enough password"


def concrete(path: str) -> str:
    """The route's path with each parameter filled in (an id that does not exist); a
    parameter with its own pattern gets a value of hex digits (a DICOM tag)."""
    return PARAM.sub(lambda m: "7FE00010" if m.group(2)
                     else "00000000-0000-4000-8000-000000000000", path)


def table(server: Any) -> list[Route]:
    return [r for r in server.app[TABLE_KEY] if r.method != "HEAD"]


def call(server: Any, route: Route, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("allow_redirects", False)
    kwargs.setdefault("timeout", 30)
    return requests.request(route.method, server.url + concrete(route.path), **kwargs)


def refused(route: Route, response: requests.Response) -> bool:
    if route.path.startswith(API_PREFIXES):
        return response.status_code == 401
    return response.status_code == 302 and response.headers["Location"].startswith("/login")


@pytest.fixture
def server(web_router: Any) -> Any:
    return web_router()


def test_every_registered_route_is_in_the_table_with_a_permission(server: Any) -> None:
    permissions = server.app[PERMISSIONS_KEY]
    for route in server.app.router.routes():
        assert route in permissions, f"{route.method} {route.resource} bypasses the table"
    public = {(r.method, r.path) for r in table(server) if r.permission == PUBLIC}
    assert public == PUBLIC_ALLOWLIST


def test_without_a_session_every_private_route_is_refused(server: Any) -> None:
    private = [r for r in table(server) if r.permission != PUBLIC]
    assert len(private) >= 3
    for route in private:
        assert refused(route, call(server, route)), f"{route.method} {route.path}"


def test_expired_tampered_and_alg_none_tokens_are_refused_on_every_route(server: Any) -> None:
    good = bearer(server.url, "admin", ADMIN_PASSWORD)["Authorization"].split()[1]
    claims = jwt.decode(good, options={"verify_signature": False})
    head, payload, signature = good.split(".")
    bad = {
        "alg=none": jwt.encode(claims, None, algorithm="none"),
        "tampered": ".".join([head, payload, signature[:-4] + "AAAA"]),
        "other key": jwt.encode(claims, "another key of at least 32 bytes!!", algorithm="HS256"),
        "expired": jwt.encode({**claims, "exp": int(time.time()) - 1},
                              "another key of at least 32 bytes!!", algorithm="HS256"),
        "role claim": jwt.encode({**claims, "role": "admin", "sub": "nobody"},
                                 "another key of at least 32 bytes!!", algorithm="HS256"),
    }
    for route in [r for r in table(server) if r.permission != PUBLIC]:
        for label, token in bad.items():
            as_bearer = call(server, route, headers={"Authorization": f"Bearer {token}"})
            as_cookie = call(server, route, cookies={"dr_session": token})
            if route.path.startswith(API_PREFIXES):
                assert as_bearer.status_code == 401, (label, route.path)
            assert refused(route, as_cookie) or as_cookie.status_code == 401, (label, route.path)


def test_role_by_route_matrix(server: Any) -> None:
    users = server.router.users
    headers = {"admin": bearer(server.url, "admin", ADMIN_PASSWORD)}
    for role in ("operator", "radiologist", "auditor"):
        users.add(f"u-{role}", role, PASSWORD, Actor("admin"))
        headers[role] = bearer(server.url, f"u-{role}", PASSWORD)
    checked = 0
    for route in table(server):
        if route.permission == PUBLIC or route.path.endswith("/logout"):
            continue
        for role in ROLE_PERMISSIONS:
            response = call(server, route, headers=headers[role], json={})
            if allowed(role, route.permission):
                assert response.status_code not in (401, 403), (role, route.method, route.path)
            else:
                assert response.status_code == 403, (role, route.method, route.path)
                checked += 1
    assert checked > 0
    # The two the issue names explicitly.
    rules_write = [r for r in table(server) if r.permission == "rules.write"]
    audit_read = [r for r in table(server) if r.permission == "audit.read"]
    assert not allowed("auditor", "rules.write") and not allowed("radiologist", "audit.read")
    for route in rules_write:
        assert call(server, route, headers=headers["auditor"], json={}).status_code == 403
    for route in audit_read:
        assert call(server, route, headers=headers["radiologist"]).status_code == 403


def test_cookie_session_without_csrf_token_gets_403_on_every_state_change(server: Any) -> None:
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    browser.csrf = ""  # the session cookie alone, as a cross-site form would send it
    changing = [r for r in table(server)
                if r.method in ("POST", "PUT", "PATCH", "DELETE") and r.permission != PUBLIC]
    assert changing
    for route in changing:
        response = browser.request(route.method, server.url + concrete(route.path),
                                   allow_redirects=False, timeout=30, data={"x": "1"})
        assert response.status_code == 403, (route.method, route.path)
        assert "CSRF" in response.text


def test_security_headers_on_pages(server: Any) -> None:
    response = requests.get(server.url + "/login", timeout=10)
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
