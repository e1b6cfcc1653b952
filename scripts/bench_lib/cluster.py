"""Several router nodes as one receiver (``scripts/bench --nodes N``): N ``dicom-router serve``
processes on one fresh PostgreSQL database and one S3 endpoint (a fresh ``moto_server`` on
127.0.0.1 with an empty bucket), each with its own data folder, ports and node id, the same
master key, all routing to one storescp sink. ``dicom-router migrate`` runs once before the
nodes start. The sender spreads a workload's associations over the nodes round robin.

With one node and S3 it is the single router on the same blob store, so that node counts
compare on equal terms.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from . import pgdb
from .procs import Child, ChildFailed, cpu_of, free_port, http_get, spawn, stop, wait_until
from .receivers import Router, Unavailable, _run_label

BUCKET = "bench-blobs"
S3_KEY = "bench"  # moto takes any credentials
MIGRATE_TIMEOUT = 120.0


def moto_tool() -> Path:
    """moto's server, installed beside the python running the bench (the test venv)."""
    return Path(sys.executable).with_name("moto_server")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Moto:
    """A moto S3 server on 127.0.0.1 with one empty bucket, for one receiver start."""

    def __init__(self) -> None:
        self.port = 0
        self.child: Child | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workdir: Path) -> None:
        tool = moto_tool()
        if not tool.exists():
            raise Unavailable(f"{tool} not found (moto[server] is in the test extras)")
        self.port = free_port()
        argv = [tool, "-H", "127.0.0.1", "-p", str(self.port)]
        self.child = spawn("moto", argv, workdir / "moto.log")
        wait_until(lambda: _listening(self.port), 30, self.child, "its port open")
        import boto3  # only here: the bench runs without it unless S3 is measured

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY
                     ).create_bucket(Bucket=BUCKET)

    def storage_toml(self) -> str:
        return f"""
[storage]
backend = "s3"
bucket = "{BUCKET}"
prefix = "bench/"
endpoint_url = "{self.endpoint}"
region = "us-east-1"
access_key_id = "{S3_KEY}"
secret_access_key = "{S3_KEY}"
"""

    def stop(self) -> None:
        if self.child is not None:
            stop(self.child)
            self.child = None


class Nodes(Router):
    """``nodes`` router nodes on one PostgreSQL database (``postgres``: an admin URL; a fresh
    database per start, dropped by :meth:`stop`) and, with ``s3``, one moto S3 endpoint."""

    def __init__(self, command: Path, name: str, postgres: str | None, nodes: int,
                 s3: bool = True) -> None:
        super().__init__(command, name=name, postgres=postgres)
        if nodes > 1 and (postgres is None or not s3):
            raise ValueError("several nodes need PostgreSQL and the S3 blob store")
        self.nodes = nodes
        self.moto = Moto() if s3 else None
        self.children: list[Child] = []
        self.node_ports: list[int] = []
        self.http_ports: list[int] = []
        self.url = ""  # the event store's URL of the current start

    @property
    def ports(self) -> list[int]:
        return list(self.node_ports)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def start(self, workdir: Path) -> None:
        if not self.command.exists():
            raise Unavailable(f"{self.command} not found (is the package installed in .venv?)")
        self.sink.start(workdir / "sink")
        storage = ""
        if self.moto is not None:
            self.moto.start(workdir)
            storage = self.moto.storage_toml()
        self.url = f"sqlite:///{workdir / 'node-1' / 'data' / 'db'}"
        if self.postgres is not None:
            try:
                self.database, self.url = pgdb.create(self.postgres, _run_label(workdir))
            except psycopg.Error as error:
                raise Unavailable(f"cannot create a PostgreSQL database: {error}") from error
        # One master key for all: each node must open what another sealed.
        common = {"DICOM_ROUTER_DATABASE_URL": self.url,
                  "DICOM_ROUTER_SECRET_KEY": secrets.token_hex(32)}
        configs = []
        for n in range(1, self.nodes + 1):
            port, http_port = free_port(), free_port()
            folder = workdir / f"node-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "router.toml"
            config.write_text(self.config(port, http_port, self.sink.port) + storage)
            configs.append((n, folder, config))
            self.node_ports.append(port)
            self.http_ports.append(http_port)
        self.port, self.http_port = self.node_ports[0], self.http_ports[0]
        self._migrate(configs[0][1], configs[0][2], common)
        # One after another, each ready before the next starts (as tests/e2e/test_cluster.py
        # does): two first starts at once both create the first admin user from the
        # settings, and the second fails on the duplicate event (router/application/users.py
        # ensure_first_admin).
        for (n, folder, config), http_port in zip(configs, self.http_ports, strict=True):
            argv: list[str | Path] = [self.command, "serve", "--config", config,
                                      "--data-dir", folder / "data"]
            env = {**common, "DICOM_ROUTER_NODE_ID": f"node-{n}"}
            child = spawn(f"{self.name}-node-{n}", argv, folder / "router.log", env)
            self.children.append(child)
            self.child = self.children[0]
            url = f"http://127.0.0.1:{http_port}/readyz"
            wait_until(lambda u=url: http_get(u, 2)[0] == 200, 90, child, "200 from /readyz")

    def _migrate(self, folder: Path, config: Path, env: dict[str, str]) -> None:
        """``dicom-router migrate`` once, before any node starts."""
        argv = [str(self.command), "--config", str(config), "--data-dir", str(folder / "data"),
                "migrate"]
        log = folder / "migrate.log"
        with log.open("wb") as out:
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=MIGRATE_TIMEOUT,
                                      env={**os.environ, **env}, check=False)
            except subprocess.TimeoutExpired as error:
                raise ChildFailed(f"migrate took over {MIGRATE_TIMEOUT:.0f} s") from error
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ChildFailed(f"migrate exited {done.returncode}\n{tail}")

    def side_cpu(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of the helpers the nodes share: moto and the PostgreSQL server
        processes serving this run's database."""
        cpu = super().side_cpu()
        if self.moto is not None and self.moto.child is not None:
            cpu["moto"] = {self.moto.child.pid: cpu_of(self.moto.child.pid)}
        return cpu

    def received_by_node(self) -> dict[str, int]:
        """Instances in the jobs view per receiving node (the view may lag behind)."""
        if self.database is None:
            return {}
        with psycopg.connect(self.url, connect_timeout=10) as conn:
            rows = conn.execute("SELECT node, count(*) FROM jobs GROUP BY node").fetchall()
        return {str(node): int(count) for node, count in rows}

    def stop(self) -> None:
        try:
            for child in self.children:
                stop(child)
            self.children = []
            self.child = None
            if self.moto is not None:
                self.moto.stop()
        finally:
            super().stop()
            self.node_ports, self.http_ports = [], []


def wait_for_jobs(nodes: Nodes, expected: int, timeout: float = 60.0) -> dict[str, int]:
    """The jobs view's count per node once it holds ``expected`` instances (or at timeout)."""
    deadline = time.monotonic() + timeout
    counts = nodes.received_by_node()
    while sum(counts.values()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = nodes.received_by_node()
    return counts
