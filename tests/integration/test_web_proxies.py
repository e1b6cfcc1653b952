"""Behind a reverse proxy: X-Forwarded-For / -Proto are believed from [web] trusted_proxies
only, and the audit trail then records the client's address."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from router.settings import SettingsError, load_settings
from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.web_harness import Browser
from web.proxies import client_address, parse_networks

TRUSTED = parse_networks(["127.0.0.0/8", "10.0.0.0/8"])


@pytest.mark.parametrize(("remote", "header", "client"), [
    ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
    # The client may send its own X-Forwarded-For: only what trusted hops appended counts.
    ("127.0.0.1", "6.6.6.6, 203.0.113.9", "203.0.113.9"),
    ("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.1.2.3", "203.0.113.9"),  # two proxies
    ("127.0.0.1", "not-an-address", "127.0.0.1"),
    ("127.0.0.1", "<script>, 10.1.2.3", "10.1.2.3"),
    ("198.51.100.1", "203.0.113.9", "198.51.100.1"),  # not from a trusted proxy: ignored
    ("127.0.0.1", "2001:db8::7", "2001:db8::7"),
])
def test_the_client_is_the_first_address_no_trusted_proxy_vouches_for(
    remote: str, header: str, client: str
) -> None:
    assert client_address(remote, header, TRUSTED) == client


def _failure_ips(server: Any) -> list[str]:
    app = server.router.stores.access
    events = [app.mapper.to_domain_event(n) for n in app.recorder.select_notifications(0, 100)
              if n.topic.endswith("LoginFailure.Recorded")]
    return [e.source_ip for e in events]


def _wrong_login(server: Any, headers: dict[str, str]) -> None:
    r = requests.post(server.url + "/api/v1/auth/token", headers=headers, timeout=30,
                      json={"username": "admin", "password": "wrong password 123"})
    assert r.status_code == 401


FORWARDED = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}


def test_behind_a_trusted_proxy_the_audit_records_the_client(
    web_router: Any, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    settings = replace(settings, web=replace(settings.web, trusted_proxies=("127.0.0.1/32",)))
    server = web_router(settings)
    _wrong_login(server, FORWARDED)
    assert _failure_ips(server) == ["203.0.113.9"]
    # TLS ended at the proxy: the cookies are Secure (a browser then sends them over https).
    form = requests.get(server.url + "/login", headers=FORWARDED, timeout=30)
    assert "Secure" in form.headers["Set-Cookie"]
    plain = requests.get(server.url + "/login", timeout=30)
    assert "Secure" not in plain.headers["Set-Cookie"]
    browser = Browser(server.url)
    browser.headers["X-Forwarded-For"] = "203.0.113.10"
    assert browser.login("admin", ADMIN_PASSWORD).status_code == 200
    app = server.router.stores.access
    started = [app.mapper.to_domain_event(n) for n in app.recorder.select_notifications(0, 100)
               if n.topic.endswith("Session.Started")]
    assert [e.source_ip for e in started] == ["203.0.113.10"]


def test_without_trusted_proxies_the_headers_are_ignored(web_router: Any) -> None:
    server = web_router()
    _wrong_login(server, FORWARDED)
    assert _failure_ips(server) == ["127.0.0.1"]


def test_trusted_proxies_must_be_networks(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('[web]\ntrusted_proxies = ["10.0.0.0/8", "proxy.local"]\n')
    with pytest.raises(SettingsError, match=r"trusted_proxies: .proxy\.local. is not"):
        load_settings({}, config_path=config)


def test_secure_cookies_marks_the_login_forms_cookie_secure_too(web_router: Any,
                                                                tmp_path: Path) -> None:
    """[web] secure_cookies (a proxy that terminates TLS without saying so): every cookie we
    set is Secure, the login form's anti-CSRF cookie as well as the session's."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    server = web_router(replace(settings, web=replace(settings.web, secure_cookies=True)))
    form = requests.get(server.url + "/login", timeout=30)
    assert "Secure" in form.headers["Set-Cookie"]
