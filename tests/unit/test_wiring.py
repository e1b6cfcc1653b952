"""router/wiring.py builds a receiver process's DICOM side without what only the supervisor
needs: a receiver process imports no pydantic, no web side, no psycopg on SQLite (their memory
is measured by the bench)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from router.settings import load_settings

CHILD = """
import json, pickle, sys

from router.wiring import receiver_process

settings = pickle.load(sys.stdin.buffer)  # as ReceiverPool hands them over
process = receiver_process(settings, on_saved=lambda: None)
services = process.services
shared = (services.qr.remote is services.commitment._remote)
process.close()
print(json.dumps({"modules": sorted(sys.modules), "shared": shared}))
"""

NOT_IN_RECEIVERS = ("pydantic", "psycopg", "web", "aiohttp", "jinja2", "router.service",
                    "router.cli", "projections.rebuild")


def test_a_receiver_process_is_wired_without_the_supervisors_imports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = replace(load_settings({}, None, data), database_url=f"sqlite:///{data / 'db'}",
                       secret_key="0" * 64)
    out = subprocess.run([sys.executable, "-c", CHILD], input=pickle.dumps(settings),
                         capture_output=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    loaded = [name for name in result["modules"]
              if name.split(".")[0] in NOT_IN_RECEIVERS or name.startswith(NOT_IN_RECEIVERS)]
    assert loaded == []
    assert "router.wiring" in result["modules"]
    assert result["shared"]  # one view of the remote nodes for Q/R and commitment
