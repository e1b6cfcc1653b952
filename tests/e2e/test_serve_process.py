"""The whole router as a process: killed with SIGKILL mid-study, stopped with SIGTERM mid-send,
and the command line's ``check-config`` and ``apply``.

DCMTK ``storescu`` is the modality and ``storescp`` the PACS; what storescu reports as stored
is what the router acknowledged, and every such instance must survive the crash.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.e2e.conftest import (
    DCMTK_ENV,
    ROUTER_AET,
    RouterProcess,
    run_cli,
    toml_document,
    wait_for,
)
from tests.integration.peers import StoreScp
from tests.synthetic import make_ct_series

pytestmark = pytest.mark.usefixtures("dcmtk")

SHUTDOWN_GRACE = 5.0
FAST_RETRIES = {"retry_delays": ["0.5s", "1s", "1s"], "retry_every": "1s"}


class StoreScuRun:
    """``storescu -v`` sending files on one association in the background.

    ``acknowledged`` lists the files answered with status Success (0x0000), in order; it is
    read from the log storescu prints for each file ("Sending file" ... "Received Store
    Response (Success)").
    """

    def __init__(self, port: int, files: Sequence[Path], calling_aet: str = "MODALITY1") -> None:
        self.acknowledged: list[Path] = []
        self.sending: list[Path] = []
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["storescu", "-v", "-aet", calling_aet, "-aec", ROUTER_AET, "127.0.0.1", str(port),
             *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        current: Path | None = None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Sending file:" in line:
                current = Path(line.split("Sending file:", 1)[1].strip())
                self.sending.append(current)
            elif "Received Store Response (Success)" in line and current is not None:
                self.acknowledged.append(current)
                current = None

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def received_uids(pacs: StoreScp) -> set[str]:
    """SOP Instance UIDs storescp holds (it names files ``<modality>.<uid>``)."""
    return {p.name.split(".", 1)[1] for p in pacs.received() if "." in p.name}


def pacs_destination(pacs: StoreScp) -> dict[str, Any]:
    # storescp serves one association at a time: one worker, so no association waits on another.
    return {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": pacs.port,
            "ae_title": pacs.ae_title, "concurrency": 1, "timeout": "10s", "idle_close": "1s"}


ROUTE_ALL = {"name": "everything", "destinations": ["pacs"]}


# --------------------------------------------------------------------------- 5. kill -9


def test_kill_9_mid_study_then_restart_delivers_every_acknowledged_instance(
    tmp_path: Path, serve_router: Callable[..., RouterProcess], database_url: str
) -> None:
    files = make_ct_series(tmp_path / "ct", count=100)  # 512 x 512, about 0.5 MB each
    uid_of = {path: sop_uid_of(path) for path in files}
    with StoreScp(tmp_path / "pacs") as pacs:
        router = serve_router(destinations=[pacs_destination(pacs)], rules=[ROUTE_ALL],
                              dispatch=FAST_RETRIES, database_url=database_url).start()
        scu = StoreScuRun(router.dicom_port, files)
        wait_for(lambda: len(scu.acknowledged) >= 30 or scu.process.poll() is not None, 60,
                 "storescu to store 30 instances")

        router.kill()

        scu.wait()
        acknowledged = {uid_of[path] for path in scu.acknowledged}
        assert 30 <= len(acknowledged) < len(files), (
            f"the kill should land mid-study; storescu said:\n{scu.output()[-3000:]}")

        router.start()

        def all_delivered() -> bool:
            rows = router.view("jobs", "SELECT j.sop_instance_uid FROM jobs j JOIN deliveries d"
                                       " ON d.job_id = j.job_id WHERE d.status = 'delivered'")
            return acknowledged <= {r["sop_instance_uid"] for r in rows}

        wait_for(all_delivered, 60, "every acknowledged instance to be delivered after restart")
        missing = acknowledged - received_uids(pacs)
        assert not missing, f"{len(missing)} acknowledged instances never reached storescp"

    jobs = router.view("jobs", "SELECT sop_instance_uid, sha256 FROM jobs")
    assert len({r["sop_instance_uid"] for r in jobs}) == len(jobs), "an instance indexed twice"
    assert router.blob_names() == {r["sha256"] for r in jobs}, "a blob without a job, or reverse"
    assert router.spool_leftovers() == []
    code, _ = router.terminate(timeout=30)
    assert code == 0


# --------------------------------------------------------------------------- 6. SIGTERM


def test_sigterm_finishes_in_flight_and_exits_zero(
    tmp_path: Path, serve_router: Callable[..., RouterProcess]
) -> None:
    files = make_ct_series(tmp_path / "ct", count=100)
    uid_of = {path: sop_uid_of(path) for path in files}
    router = serve_router(dispatch={"shutdown_grace": f"{SHUTDOWN_GRACE}s"}).start()
    scu = StoreScuRun(router.dicom_port, files)
    wait_for(lambda: len(scu.acknowledged) >= 20 or scu.process.poll() is not None, 60,
             "storescu to store 20 instances")

    code, took = router.terminate(timeout=4 * SHUTDOWN_GRACE)
    assert len(scu.acknowledged) < len(files) or len(scu.sending) > 20, "SIGTERM came too late"

    assert code == 0, router.log()[-3000:]
    assert took <= SHUTDOWN_GRACE + 3.0, f"took {took:.1f} s to exit"
    scu.wait()
    acknowledged = {uid_of[path] for path in scu.acknowledged}
    assert len(acknowledged) >= 20
    # Whatever was in flight got an answer: nothing storescu sent is left without a response,
    # unless the association was aborted (between two C-STOREs, never in the middle of one).
    if "Association Aborted" not in scu.output() and "Peer aborted" not in scu.output():
        assert len(scu.acknowledged) == len(scu.sending), scu.output()[-3000:]

    router.start()

    stored = {r["sop_instance_uid"] for r in router.view("jobs", "SELECT sop_instance_uid"
                                                                 " FROM jobs")}
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged, not in jobs"
    assert stored <= set(uid_of.values())
    assert router.spool_leftovers() == []
    assert router.blob_names() == {r["sha256"] for r in router.view("jobs", "SELECT sha256"
                                                                             " FROM jobs")}
    code, _ = router.terminate(timeout=30)
    assert code == 0


# --------------------------------------------------------------------------- 10. the CLI


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml_document(
        {"dispatch": {"default_destination": "nowhere"}},
        {
            "destinations": [
                {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "ae_title": "PACS"},
                {"name": "pacs", "type": "file", "path": "relative/folder"},
                {"name": "viewer", "type": "dicom", "host": "127.0.0.1", "port": 104,
                 "ae_title": "AN_AE_TITLE_FAR_TOO_LONG"},
                {"name": "ftp-site", "type": "ftp"},
                {"name": "archive", "type": "file", "path": str(tmp_path), "concurency": 2},
            ],
            "rules": [
                {"name": "ct", "modality": ["CT"], "destinations": ["pacs", "missing-dest"]},
                {"name": "ct", "destinations": ["viewer"]},
                {"name": "typo", "modalty": ["MR"], "destinations": ["archive"]},
                {"name": "bad-regex", "destinations": ["archive"],
                 "match": [{"tag": "PatientID", "op": "regex", "value": "("}]},
            ],
        },
    ))

    result = run_cli("check-config", str(config))

    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith(f"{config}: ")]
    expected = [
        ("destinations[0].port: required",),
        ("destinations[1].path: ",),
        ("destinations[2].ae_title: ",),
        ("destinations[3].type: ", "ftp"),
        ("destinations[4].concurency: ", "did you mean 'concurrency'?"),
        ("destinations[1].name: destination 'pacs' is declared more than once",),
        ("rules[0].destinations[1]: ", "missing-dest"),
        ("rules[1].name: rule 'ct' is declared more than once",),
        ("rules[2].modalty: ", "did you mean 'modality'?"),
        ("rules[3].match[0].value: ",),
        ("dispatch.default_destination: ", "nowhere"),
    ]
    for fragments in expected:
        assert any(all(f in p for f in fragments) for p in problems), (
            f"no problem mentions {fragments}; reported:\n" + "\n".join(problems))
    assert not any("unknown destination 'pacs'" in p for p in problems), (
        "'pacs' is declared (twice, invalid): it is not an unknown destination")
    assert len(problems) == len(expected), "\n".join(problems)

    config.write_text(toml_document({"storage": {"destination_roots": [str(tmp_path)]}}, {
        "destinations": [{"name": "archive", "type": "file", "path": str(tmp_path)}],
        "rules": [{"name": "all", "destinations": ["archive"]}]}))
    ok = run_cli("check-config", str(config))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def admin_event_count(server_config: Path, data_dir: Path, database_url: str) -> int:
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///")) / "admin.sqlite"
        with sqlite3.connect(path) as conn:
            return int(conn.execute("SELECT count(*) FROM stored_events").fetchone()[0])
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM admin_events").fetchone()
        assert row is not None
        return int(row[0])


def test_apply_is_idempotent(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "data"
    server = tmp_path / "server.toml"
    server.write_text(toml_document({
        "server": {"data_dir": str(data_dir), "database_url": database_url,
                   "secret_key": "0" * 64},
        "security": {"allow_loopback_destinations": True},
        "storage": {"destination_roots": [str(tmp_path)]}}))
    archive = tmp_path / "archive"
    archive.mkdir()
    declared = tmp_path / "routing.toml"
    destinations = [
        {"name": "archive", "type": "file", "path": str(archive)},
        {"name": "cloud", "type": "s3", "bucket": "images", "access_key_id": "AKIAEXAMPLE",
         "secret_access_key": "a-secret", "endpoint_url": "http://127.0.0.1:9"},
    ]
    rules = [{"name": "ct", "modality": ["CT"], "destinations": ["archive", "cloud"]},
             {"name": "rest", "priority": 200, "destinations": ["archive"]}]
    declared.write_text(toml_document({}, {"destinations": destinations, "rules": rules}))

    first = run_cli("apply", str(declared), config=server)
    assert first.returncode == 0, first.stderr
    assert "2 destination(s) and 2 rule(s) changed, 0 deleted" in first.stdout
    events = admin_event_count(server, data_dir, database_url)

    for _ in range(2):
        again = run_cli("apply", str(declared), config=server)
        assert again.returncode == 0, again.stderr
        assert "0 destination(s) and 0 rule(s) changed, 0 deleted" in again.stdout
    assert admin_event_count(server, data_dir, database_url) == events

    rules[1] = {**rules[1], "priority": 300}
    declared.write_text(toml_document({}, {"destinations": destinations[:1], "rules": rules[1:]}))
    changed = run_cli("apply", str(declared), config=server)
    assert changed.returncode == 0, changed.stderr
    assert "0 destination(s) and 1 rule(s) changed, 2 deleted" in changed.stdout
    assert run_cli("apply", str(declared), config=server).stdout.count("0 deleted") == 1


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nlog_format = "xml"\n')
    result = run_cli("--data-dir", str(tmp_path / "data"), "serve", config=config, timeout=30)
    assert result.returncode == 2
    assert "log_format" in result.stderr


def test_sigint_stops_like_sigterm(
    tmp_path: Path, serve_router: Callable[..., RouterProcess]
) -> None:
    router = serve_router().start()
    started = time.monotonic()
    router.signal(signal.SIGINT)
    assert router.wait(20) == 0
    assert time.monotonic() - started < SHUTDOWN_GRACE + 3.0


# --------------------------------------------------------------------------- receivers


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_receiver_process_killed_is_restarted_and_receives_again(
    tmp_path: Path, serve_router: Callable[..., RouterProcess]
) -> None:
    import os

    files = make_ct_series(tmp_path / "ct", count=4, rows=32, cols=32)
    with StoreScp(tmp_path / "pacs") as pacs:
        router = serve_router(destinations=[pacs_destination(pacs)], rules=[ROUTE_ALL],
                              dispatch=FAST_RETRIES).start()
        assert router.process is not None
        receivers = _children(router.process.pid)
        assert len(receivers) == 2, "two receiver processes and nothing else (no helper)"
        os.kill(receivers[0], signal.SIGKILL)
        wait_for(lambda: len(set(_children(router.process.pid)) - set(receivers)) == 1, 30,
                 "the killed receiver to be replaced")
        wait_for(lambda: router.readyz() == 200, 30, "readiness with both receivers")
        for path in files:  # each association lands on either receiver
            scu = StoreScuRun(router.dicom_port, [path])
            scu.wait()
            assert scu.acknowledged == [path], scu.output()[-2000:]
        wait_for(lambda: len(received_uids(pacs)) == len(files), 30, "the deliveries")
        assert "restarting" in router.log()
