"""Refused associations reach the audit trail, counted per source and reason (one event per
minute, not one per refusal), and become ATNA Security Alerts (Node Authentication)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from router.atna.messages import Source, message_for
from tests.conftest import make_settings


def echo(port: int, calling: str, called: str) -> int:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode


def test_refused_associations_are_counted_into_the_audit_trail(
        tmp_path: Path, start_router: Any, dcmtk: None) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    settings = replace(settings, dicom=replace(settings.dicom, require_called_aet=True))
    router = start_router(settings)
    port = router.dicom.port
    assert echo(port, "ROGUE", "NOT_US") != 0
    assert echo(port, "ROGUE", "NOT_US") != 0
    assert echo(port, "<b>X</b>", "NOT_US") != 0
    assert echo(port, "FRIEND", "DICOMROUTER") == 0  # accepted: not counted
    assert router.refusals is not None and router.refusals.flush() == 2
    router.runner.catch_up()
    rows = router.view_db("audit").query(
        "SELECT * FROM audit WHERE action = 'AssociationRefusal.Recorded' ORDER BY actor")
    seen = {(r["actor"], r["source_ip"], r["outcome"], json.loads(r["detail"])["count"],
             json.loads(r["detail"])["reason"]) for r in rows}
    assert seen == {("ROGUE", "127.0.0.1", "failure", 2, "called AE title not recognised"),
                    ("<b>X</b>", "127.0.0.1", "failure", 1, "called AE title not recognised")}
    assert router.refusals.flush() == 0  # counted once
    xml = message_for(next(r for r in rows if r["actor"] == "ROGUE"),
                      Source("DICOMROUTER", "DICOMROUTER", "node"))
    assert xml is not None and b'csd-code="110126"' in xml and b"(2 times)" in xml
