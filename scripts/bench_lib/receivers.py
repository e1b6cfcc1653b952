"""The receivers the bench sends to: DCMTK storescp, Orthanc, and the router (which forwards to a
second storescp, the sink). Each one is started fresh in its own folder for every measurement.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import psycopg

from . import pgdb
from .procs import (
    DCMTK_ENV,
    Child,
    cpu_of,
    dicom_echo,
    free_port,
    http_get,
    spawn,
    stop,
    wait_until,
)

MAX_PDU = 131072  # the largest DCMTK accepts; what storescp and Orthanc advertise here
ORTHANC = "/usr/sbin/Orthanc"


class Unavailable(RuntimeError):
    """The receiver cannot run here (not installed); the bench skips it and says why."""


# What storescp, Orthanc and Python print when a port is taken between our check and their bind.
_PORT_CLASH = re.compile(r"already in use|address in use|EADDRINUSE|Errno 98", re.IGNORECASE)


def port_clash(error: BaseException) -> bool:
    """True when a failed start says a port was taken (worth a retry with other ports)."""
    return bool(_PORT_CLASH.search(str(error)))


def count_files(folder: Path) -> int:
    """Files directly in ``folder`` (storescp writes one per instance)."""
    try:
        return sum(1 for entry in os.scandir(folder) if entry.is_file())
    except FileNotFoundError:
        return 0


class Receiver:
    """A C-STORE SCP on 127.0.0.1:``port`` answering to ``ae_title``."""

    name = "receiver"
    ae_title = "ANY-SCP"
    forwards = False  # True when it delivers onwards (end-to-end time is measured)

    def __init__(self) -> None:
        self.port = 0
        self.child: Child | None = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def pids(self) -> list[int]:
        """The roots of the process trees whose memory and CPU are the receiver's."""
        return [self.pid]

    @property
    def ports(self) -> list[int]:
        """The DICOM ports a workload's associations are spread over, round robin."""
        return [self.port]

    def side_cpu(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of servers the receiver uses but does not own (PostgreSQL,
        moto), by name and process id; measured apart from its own."""
        return {}

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    def received(self) -> int | None:
        """Instances stored so far, or None when the receiver cannot tell."""
        raise NotImplementedError

    def delivered(self) -> int:
        """Instances that arrived at the final destination (forwarding receivers only)."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.child is not None:
            stop(self.child)
            self.child = None


class StoreScp(Receiver):
    """DCMTK storescp, one forked process per association, every SOP class and transfer syntax."""

    name = "storescp"
    ae_title = "STORESCP"

    def __init__(self, ae_title: str = "STORESCP") -> None:
        super().__init__()
        self.ae_title = ae_title
        self.out = Path()

    @staticmethod
    def argv(ae_title: str, out: Path | str, port: int | str) -> list[str]:
        # --fork so that 4 concurrent associations are served concurrently, as by Orthanc.
        flags = ["--fork", "--promiscuous", "--accept-all", "--disable-host-lookup"]
        return [
            "storescp",
            *flags,
            "-aet",
            ae_title,
            "-pdu",
            str(MAX_PDU),
            "-od",
            str(out),
            str(port),
        ]

    def start(self, workdir: Path) -> None:
        self.out = workdir / "received"
        self.out.mkdir(parents=True)
        self.port = free_port()
        argv = self.argv(self.ae_title, self.out, self.port)
        self.child = spawn(self.name, argv, workdir / f"{self.name}.log", DCMTK_ENV)
        wait_until(lambda: dicom_echo(self.port, self.ae_title), 20, self.child, "C-ECHO")

    def received(self) -> int | None:
        return count_files(self.out)


class Orthanc(Receiver):
    """Orthanc with its own config, SQLite index and storage in the work folder, no plugins."""

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self) -> None:
        super().__init__()
        self.http_port = 0

    @staticmethod
    def config(workdir: Path, dicom_port: int, http_port: int) -> dict[str, object]:
        """Orthanc defaults otherwise, including SyncStorageArea (fsync) and 4 DICOM threads."""
        return {
            "Name": "bench",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAeTitle": False,
            "MaximumPduLength": MAX_PDU,
            "Plugins": [],
            "SaveJobs": False,
        }

    def start(self, workdir: Path) -> None:
        if not os.access(ORTHANC, os.X_OK):
            raise Unavailable(f"{ORTHANC} not found")
        self.port, self.http_port = free_port(), free_port()
        config = workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(workdir, self.port, self.http_port), indent=2))
        self.child = spawn(self.name, [ORTHANC, config], workdir / "orthanc.log", DCMTK_ENV)
        url = f"http://127.0.0.1:{self.http_port}/system"
        wait_until(lambda: http_get(url)[0] == 200, 60, self.child, "HTTP /system")
        wait_until(lambda: dicom_echo(self.port, self.ae_title), 20, self.child, "C-ECHO")

    def received(self) -> int | None:
        status, body = http_get(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30)
        return int(json.loads(body)["CountInstances"]) if status == 200 else None


def _run_label(workdir: Path) -> str:
    """"ct1-router-pg-2" for a run's folder, "ct1-router-pg-2-attempt-2" for a retry's."""
    if workdir.name.startswith("attempt-"):
        return f"{workdir.parent.name}-{workdir.name}"
    return workdir.name


class Router(Receiver):
    """``dicom-router serve`` with a TOML that routes everything to a storescp sink; its event
    store is SQLite in the work folder, or with ``postgres`` (an admin URL) a fresh PostgreSQL
    database created for this start and dropped by :meth:`stop`."""

    name = "router"
    ae_title = "DICOMROUTER"
    forwards = True

    def __init__(self, command: Path, name: str = "router", postgres: str | None = None) -> None:
        super().__init__()
        self.command = command
        self.name = name  # "router-b": the build a --compare run measures beside it
        self.postgres = postgres
        self.database: str | None = None  # the PostgreSQL database of the current start
        self.http_port = 0
        self.sink = StoreScp("SINK")

    def start(self, workdir: Path) -> None:
        if not self.command.exists():
            raise Unavailable(f"{self.command} not found (is the package installed in .venv?)")
        self.sink.start(workdir / "sink")
        self.port, self.http_port = free_port(), free_port()
        config = workdir / "router.toml"
        config.write_text(self.config(self.port, self.http_port, self.sink.port))
        argv: list[str | Path] = [self.command, "serve", "--config", config]
        argv += ["--data-dir", workdir / "data"]
        # Set either way, so that a DICOM_ROUTER_DATABASE_URL in the bench's environment
        # cannot make the "router" row measure another backend than its name says.
        url = f"sqlite:///{workdir / 'data' / 'db'}"
        if self.postgres is not None:
            try:
                self.database, url = pgdb.create(self.postgres, _run_label(workdir))
            except psycopg.Error as error:
                raise Unavailable(f"cannot create a PostgreSQL database: {error}") from error
        env = {"DICOM_ROUTER_DATABASE_URL": url}
        self.child = spawn(self.name, argv, workdir / "router.log", env)
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        wait_until(lambda: http_get(url, 2)[0] == 200, 60, self.child, "200 from /readyz")

    @staticmethod
    def config(dicom_port: int, http_port: int, sink_port: int) -> str:
        return f"""\
[server]
ae_title = "DICOMROUTER"
dicom_port = {dicom_port}
http_port = {http_port}

[security]
allow_loopback_destinations = true  # the sink listens on 127.0.0.1

[[destinations]]
name = "sink"
type = "dicom"
host = "127.0.0.1"
port = {sink_port}
ae_title = "SINK"

[[rules]]
name = "everything to sink"
calling_aet = "*"
destinations = ["sink"]
"""

    def side_cpu(self) -> dict[str, dict[int, float]]:
        """The PostgreSQL server processes connected to this start's database (those that
        exited before the end of the run are missed; the server's own writers are not
        counted)."""
        if self.database is None or self.postgres is None:
            return {}
        try:
            with psycopg.connect(self.postgres, autocommit=True, connect_timeout=10) as conn:
                rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                    (self.database,)).fetchall()
        except psycopg.Error:
            return {}
        return {"postgres": {int(pid): cpu_of(int(pid)) for (pid,) in rows}}

    def received(self) -> int | None:
        return None  # no stable API to ask yet; delivery to the sink is the check

    def delivered(self) -> int:
        return self.sink.received() or 0

    def stop(self) -> None:
        try:
            super().stop()
            self.sink.stop()
        finally:
            if self.database is not None:
                try:
                    pgdb.drop(self.database)
                except psycopg.Error as error:  # pgdb.drop_all tries again at exit
                    print(f"  could not drop database {self.database}: {error}", flush=True)
                self.database = None
