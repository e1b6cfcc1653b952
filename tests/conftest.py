"""Shared fixtures: backends (SQLite and a fresh PostgreSQL database per test), settings and
an in-process router that is stopped after the test."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.dispatch.folders import FolderPolicy
from router.dispatch.policy import DestinationPolicy
from router.dispatch.ssrf import AddressPolicy
from router.settings import (
    DicomSettings,
    DispatchSettings,
    SecuritySettings,
    Settings,
    load_settings,
)

ADMIN_PASSWORD = "correct horse battery"  # the first admin of every test router

_RUNNING: list[Any] = []  # routers started by start_router and not yet torn down

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def fast_password_hashes(request: pytest.FixtureRequest,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at cost 4, its minimum, in this process: the same code, without 0.25 s per hash
    (each in-process router's first admin, each login). Routers run as ``dicom-router``
    processes keep the real cost. Tests about the cost or the time a login takes opt out with
    ``@pytest.mark.real_password_cost``."""
    if request.node.get_closest_marker("real_password_cost") is None:
        from router.application import users

        monkeypatch.setattr(users, "BCRYPT_ROUNDS", 4)



@pytest.fixture(autouse=True, scope="session")
def test_scus_send_without_delay() -> Iterator[None]:
    """The tests' own pynetdicom SCUs stand in for modalities: they send with TCP_NODELAY, as
    the router's own associations do (router.dicom.tuning.CONNECTION_HANDLERS) and as DCMTK
    does with TCP_NODELAY=1. Without it each C-STORE they send can wait for a delayed ACK
    (about 40 ms): the router used to set it on every pynetdicom socket of its process, the
    tests' included, until it kept to pynetdicom's public event handlers."""
    from pynetdicom import AE

    from router.dicom.tuning import CONNECTION_HANDLERS

    real = AE.associate

    def associate(self: Any, *args: Any, evt_handlers: Any = None, **kwargs: Any) -> Any:
        handlers = list(evt_handlers or [])
        handlers += [h for h in CONNECTION_HANDLERS if h not in handlers]
        return real(self, *args, evt_handlers=handlers, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AE, "associate", associate)
        yield


def _pg_base() -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A brand-new PostgreSQL database, dropped after the test."""
    name = f"router_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{_pg_base()}/{name}"
    try:
        yield url
    finally:
        # A router fixture set up before this one would be torn down after it: stop such
        # routers now, before their database goes (else their stop waits on a dead server).
        for router in _RUNNING:
            if router.ready and router.settings.database_url == url:
                router.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend-parametrised test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db'}"
    return str(request.getfixturevalue("pg_url"))


def make_settings(tmp_path: Path, database_url: str, config: Path | None = None,
                  **overrides: Any) -> Settings:
    """Settings for a test router: random ports on loopback, fast polling. Every test peer
    (storescp, Orthanc, moto, AI stubs) runs on loopback, so loopback destinations are allowed,
    and file destinations may write anywhere below ``tmp_path`` (outside the data folder)."""
    settings = load_settings({}, config, tmp_path / "data")
    settings = replace(
        settings,
        database_url=database_url,
        dicom_host="127.0.0.1", dicom_port=0, http_host="127.0.0.1", http_port=0,
        secret_key="0" * 64,
        admin_password=ADMIN_PASSWORD,
        dispatch=replace(settings.dispatch, poll_interval=0.2, shutdown_grace=5.0),
        dicom=replace(settings.dicom, network_timeout=10, acse_timeout=10, dimse_timeout=30,
                      processes=0),
        security=SecuritySettings(allow_loopback_destinations=True),
        storage=replace(settings.storage, destination_roots=(
            *settings.storage.destination_roots, tmp_path)),
    )
    return replace(settings, **overrides)


def open_policy(root: Path = Path("/")) -> DestinationPolicy:
    """The destination policy of tests that build adapters or commands without settings:
    peers on loopback allowed (metadata addresses still refused), files anywhere below
    ``root``."""
    addresses = AddressPolicy(allow_loopback=True)
    return DestinationPolicy(addresses, addresses, FolderPolicy(roots=(root,)))


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build and start in-process routers; all are stopped at teardown."""
    from router.service import Router

    started: list[Router] = []

    def start(settings: Settings) -> Router:
        router = Router.build(settings)
        router.start()
        started.append(router)
        _RUNNING.append(router)
        return router

    yield start
    for router in started:
        if router.ready:
            router.stop()
        _RUNNING.remove(router)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def outdated_on_next_read(owner: Any, method: str, change: Callable[[Any], None],
                          save: Callable[[Any], None]) -> None:
    """The next ``owner.method(...)`` returns an aggregate that another writer then outdates
    (a second copy is read, ``change``d and ``save``d): the interleaving of a concurrent save
    between a command's read and its own save."""
    real = getattr(owner, method)

    def read(*args: Any) -> Any:
        setattr(owner, method, real)
        stale, other = real(*args), real(*args)
        assert other is not None
        change(other)
        save(other)
        return stale

    setattr(owner, method, read)


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """DCMTK must be installed (scripts/test installs it); a missing peer is a failure."""
    for tool in ("storescu", "storescp", "echoscu"):
        assert shutil.which(tool), f"{tool} not found: run scripts/test, which installs dcmtk"


__all__ = ["DicomSettings", "DispatchSettings", "make_settings", "open_policy", "wait_for"]


@pytest.fixture
def web_router(start_router: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start an in-process router with its web application on a free port; returns a
    WebServer (``.url``, ``.router``). Stopped at teardown."""
    from tests.web_harness import WebServer

    servers: list[WebServer] = []

    def start(settings: Settings | None = None) -> WebServer:
        router = start_router(settings or make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
        server = WebServer(router)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
