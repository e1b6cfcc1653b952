"""Helpers to run ``dicom-router serve`` as a real process: a TOML config on free ports, a data
folder, readiness through ``GET /readyz``, and stopping with SIGTERM or SIGKILL.

Every process started through the ``serve_router`` fixture is killed at teardown if the test
left it running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for  # re-exported for the e2e tests
from tests.integration.peers import free_port  # re-exported for the e2e tests

ROUTER_BIN = Path(sys.executable).parent / "dicom-router"
ROUTER_AET = "DICOMROUTER"
SECRET_KEY = "0" * 64
READY_TIMEOUT = 30.0
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}




def toml_value(value: Any) -> str:
    """A TOML literal for the few value types our configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def toml_document(tables: Mapping[str, Mapping[str, Any]],
                  arrays: Mapping[str, Sequence[Mapping[str, Any]]] = ()) -> str:
    """``[table]`` sections, then ``[[array]]`` entries (destinations, rules)."""
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for name, items in dict(arrays).items():
        for item in items:
            lines.append(f"[[{name}]]")
            lines += [f"{key} = {toml_value(value)}" for key, value in item.items()]
            lines.append("")
    return "\n".join(lines)


@dataclass
class RouterProcess:
    """One ``dicom-router serve`` process (restartable on the same config and data folder)."""

    folder: Path
    destinations: Sequence[Mapping[str, Any]] = ()
    rules: Sequence[Mapping[str, Any]] = ()
    dispatch: Mapping[str, Any] = field(default_factory=dict)
    database_url: str | None = None
    node_id: str = ""  # several nodes on one database each need their own
    server: Mapping[str, Any] = field(default_factory=dict)  # more [server] keys
    storage: Mapping[str, Any] = field(default_factory=dict)  # more [storage] keys
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def config_path(self) -> Path:
        return self.folder / "router.toml"

    @property
    def log_path(self) -> Path:
        return self.folder / "router.log"

    def write_config(self) -> Path:
        server: dict[str, Any] = {
            "ae_title": ROUTER_AET, "dicom_host": "127.0.0.1", "dicom_port": self.dicom_port,
            "http_host": "127.0.0.1", "http_port": self.http_port, "secret_key": SECRET_KEY,
            "log_level": "INFO",
        }
        if self.database_url:
            server["database_url"] = self.database_url
        if self.node_id:
            server["node_id"] = self.node_id
        server.update(self.server)
        dispatch = {"poll_interval": "0.2s", "shutdown_grace": "5s", **self.dispatch}
        self.folder.mkdir(parents=True, exist_ok=True)
        # The peers of these tests listen on loopback; file destinations go below the folder.
        self.config_path.write_text(toml_document(
            {"server": server, "dispatch": dispatch,
             "security": {"allow_loopback_destinations": True},
             "storage": {"destination_roots": [str(self.folder)], **self.storage}},
            {"destinations": self.destinations, "rules": self.rules}))
        return self.config_path

    def start(self, timeout: float = READY_TIMEOUT) -> RouterProcess:
        """Start ``serve`` and wait until ``/readyz`` answers 200."""
        assert self.process is None or self.process.poll() is not None, "already running"
        if not self.config_path.exists():
            self.write_config()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {self.starts} ====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [str(ROUTER_BIN), "--config", str(self.config_path), "--data-dir",
                 str(self.data_dir), "serve"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"dicom-router exited with {self.process.returncode} while starting;"
                            f" log:\n{self.log()[-4000:]}")
            if self.readyz() == 200 and self._answered_by_us():
                return
            time.sleep(0.1)
        pytest.fail(f"dicom-router was not ready within {timeout:.0f} s; log:\n"
                    f"{self.log()[-4000:]}")

    def _answered_by_us(self) -> bool:
        """Whether /readyz names this node (when it has an id): a port that another node
        answered on must not pass for this node being ready."""
        if not self.node_id:
            return True
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.loads(response.read()).get("node") == self.node_id)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def readyz(self) -> int | None:
        """The HTTP status of ``GET /readyz`` (None when nothing answers)."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL to the router and its receiver processes at once: no shutdown code runs."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # serve leads its own process group
        self.wait(10)
        wait_for(lambda: not self.group_alive(), 10, "the router's processes to die")

    def group_alive(self) -> bool:
        """Whether any process of the router's process group is still running."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; returns the exit code and how long the process took to exit."""
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dicom-router did not exit within {timeout:.0f} s; log:\n"
                        f"{self.log()[-4000:]}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def view(self, name: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read a view directly (read-only; fine while the router runs): its SQLite file, or
        the PostgreSQL database when the router runs on one."""
        if self.database_url and self.database_url.startswith("postgresql://"):
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.database_url, row_factory=dict_row) as pg:
                return list(pg.execute(sql.replace("?", "%s"), params).fetchall())
        folder = self.data_dir / "db"
        if self.database_url and self.database_url.startswith("sqlite:///"):
            folder = Path(self.database_url.removeprefix("sqlite:///"))
        path = folder / f"view_{name}.sqlite"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def blob_names(self) -> set[str]:
        return {p.name for p in (self.data_dir / "blobs").rglob("*") if p.is_file()}

    def spool_leftovers(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "spool").iterdir())


@pytest.fixture
def serve_router(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Build (not start) router processes in folders of ``tmp_path``; killed at teardown."""
    made: list[RouterProcess] = []

    def make(name: str = "router", **kwargs: Any) -> RouterProcess:
        router = RouterProcess(tmp_path / name, **kwargs)
        made.append(router)
        return router

    yield make
    for router in made:
        if router.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(router.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                router.process.wait(10)




def run_cli(*args: str, config: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``dicom-router [--config FILE] ARGS...`` to completion."""
    command = [str(ROUTER_BIN)]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)
