"""Logins, sessions, bearer and API tokens, CSRF, roles: against the real web application."""

from __future__ import annotations

import time
from typing import Any

import jwt
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD
from tests.web_harness import Browser, bearer


def test_login_sets_an_httponly_strict_cookie_and_logout_revokes_it(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    r = browser.login("admin", ADMIN_PASSWORD)
    assert r.status_code == 200 and r.url.endswith("/")
    cookie = next(c for c in browser.cookies if c.name == "dr_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    raw_header = r.history[0].headers["Set-Cookie"]
    assert "SameSite=Strict" in raw_header and "HttpOnly" in raw_header
    assert browser.csrf
    stolen = cookie.value
    assert browser.post(browser.url("/logout")).url.endswith("/login")
    replay = requests.get(server.url + "/", cookies={"dr_session": stolen},
                          allow_redirects=False, timeout=10)
    assert replay.status_code == 302 and replay.headers["Location"].startswith("/login")


def test_wrong_password_is_refused_and_recorded_then_locked_out(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    for _ in range(5):
        r = browser.login("admin", "wrong password 123")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = browser.login("admin", ADMIN_PASSWORD)
    assert r.status_code == 401 and "Too many failed attempts" in r.text
    r = requests.post(server.url + "/api/v1/auth/token",
                      json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30)
    assert r.status_code == 429
    failures = [n for n in server.router.stores.access.recorder.select_notifications(0, 100)
                if n.topic.endswith("LoginFailure.Recorded")]
    assert len(failures) == 7


def test_bearer_token_from_the_token_endpoint(web_router: Any) -> None:
    server = web_router()
    r = requests.post(server.url + "/api/v1/auth/token",
                      json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["token_type"] == "bearer" and body["expires_in"] > 0
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    me = requests.get(server.url + "/api/v1/auth/me", headers=headers, timeout=10)
    assert me.json() == {"username": "admin", "role": "admin", "authenticated_by": "bearer"}
    # A bearer request needs no CSRF token (no ambient credential); logout ends the session.
    assert requests.post(server.url + "/api/v1/auth/logout", headers=headers,
                         timeout=10).status_code == 200
    assert requests.get(server.url + "/api/v1/auth/me", headers=headers,
                        timeout=10).status_code == 401


def test_token_endpoint_validates_its_body(web_router: Any) -> None:
    server = web_router()
    r = requests.post(server.url + "/api/v1/auth/token", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(server.url + "/api/v1/auth/token", json={"username": "admin"}, timeout=10)
    assert r.status_code == 422 and "password" in r.json()["error"]["fields"]


def test_forged_expired_and_alg_none_tokens_are_refused(web_router: Any) -> None:
    server = web_router()
    good = bearer(server.url, "admin", ADMIN_PASSWORD)["Authorization"].split()[1]
    claims = jwt.decode(good, options={"verify_signature": False})
    none_token = jwt.encode(claims, key=None, algorithm="none")
    forged = jwt.encode(claims, "not-our-key-but-long-enough-for-hs256", algorithm="HS256")
    expired_claims = {**claims, "exp": int(time.time()) - 10}
    expired = jwt.encode(expired_claims, "x" * 32, algorithm="HS256")
    head, payload, sig = good.split(".")
    tampered = ".".join([head, payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB"), sig])
    for token in (none_token, forged, expired, tampered, "garbage"):
        r = requests.get(server.url + "/api/v1/auth/me",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 401, token
        r = requests.get(server.url + "/", cookies={"dr_session": token},
                         allow_redirects=False, timeout=10)
        assert r.status_code == 302, token


def test_state_change_without_csrf_token_is_403(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    csrf, browser.csrf = browser.csrf, ""
    r = browser.post(browser.url("/logout"), allow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = browser.post(browser.url("/logout"), data={"csrf_token": "0" * 64},
                     allow_redirects=False)
    assert r.status_code == 403
    r = browser.post(browser.url("/logout"), data={"csrf_token": csrf}, allow_redirects=False)
    assert r.status_code == 302


def test_password_change_ends_old_sessions_and_api_tokens_work_until_revoked(
    web_router: Any,
) -> None:
    server = web_router()
    users = server.router.users
    users.add("rad1", "radiologist", "radiologist pass 1", Actor("admin"))
    headers = bearer(server.url, "rad1", "radiologist pass 1")
    new = users.create_token("rad1", "pacs script", Actor("admin"))
    api = {"Authorization": f"Bearer {new.value}"}
    me = requests.get(server.url + "/api/v1/auth/me", headers=api, timeout=10).json()
    assert me["authenticated_by"] == "api_token"
    users.set_password("rad1", "another password 2", Actor("admin"))
    assert requests.get(server.url + "/api/v1/auth/me", headers=headers,
                        timeout=10).status_code == 401
    users.revoke_token("rad1", new.token_id, Actor("admin"))
    assert requests.get(server.url + "/api/v1/auth/me", headers=api,
                        timeout=10).status_code == 401


def test_a_password_over_72_bytes_gets_a_clear_message(web_router: Any) -> None:
    import pytest

    from router.application.users import PasswordError

    server = web_router()
    with pytest.raises(PasswordError, match="72 bytes"):
        server.router.users.add("long", "auditor", "é" * 40, Actor("admin"))
    with pytest.raises(PasswordError, match="at least 12"):
        server.router.users.add("short", "auditor", "short", Actor("admin"))


def test_enabling_a_disabled_user_again_does_not_revive_old_sessions(web_router: Any) -> None:
    server = web_router()
    users = server.router.users
    users.add("op1", "operator", "operator pass 12", Actor("admin"))
    old = bearer(server.url, "op1", "operator pass 12")
    users.set_disabled("op1", True, Actor("admin"))
    users.set_disabled("op1", False, Actor("admin"))
    assert requests.get(server.url + "/api/v1/auth/me", headers=old, timeout=10).status_code == 401
    fresh = bearer(server.url, "op1", "operator pass 12")
    assert requests.get(server.url + "/api/v1/auth/me", headers=fresh,
                        timeout=10).status_code == 200
