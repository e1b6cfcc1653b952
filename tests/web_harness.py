"""The router's web application served from a background thread, and a logged-in client.

Tests drive it with ``requests`` (real HTTP on 127.0.0.1), the way a browser or script would.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import requests
from aiohttp import web

from web.app import create_app

CSRF_META = re.compile(r'"X-CSRF-Token": "([0-9a-f]+)"')
LOGIN_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class WebServer:
    """create_app(router) on 127.0.0.1 and a free port, in its own thread and event loop."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._runner = web.AppRunner(create_app(self.router), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def app(self) -> web.Application:
        assert self._runner is not None
        return self._runner.app

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class Browser(requests.Session):
    """A requests session that logs in through the login form and sends the CSRF token."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base
        self.csrf = ""

    def url(self, path: str) -> str:
        return self.base + path

    def login(self, username: str, password: str) -> requests.Response:
        form = self.get(self.url("/login"))
        token = LOGIN_CSRF.search(form.text)
        assert token, "login form has no CSRF field"
        response = self.post(self.url("/login"), data={
            "username": username, "password": password, "csrf_token": token.group(1),
            "next": "/"})
        page = self.get(self.url("/"))
        found = CSRF_META.search(page.text)
        self.csrf = found.group(1) if found else ""
        return response

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if request.method not in ("GET", "HEAD", "OPTIONS") and self.csrf:
            request.headers.setdefault("X-CSRF-Token", self.csrf)
        return super().send(request, **kwargs)


def bearer(base: str, username: str, password: str) -> dict[str, str]:
    """Authorization headers of a fresh bearer session (POST /api/v1/auth/token)."""
    r = requests.post(base + "/api/v1/auth/token",
                      json={"username": username, "password": password}, timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['access_token']}"}
