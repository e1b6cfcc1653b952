"""``dicom-router projections rebuild`` refuses while a router serves the same database (the
serving lock of router/cluster/serving.py: an flock beside the SQLite files, a shared advisory
lock on PostgreSQL), says why, and rebuilds with ``--force`` or once the router has stopped.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.cluster.serving import ServingLock
from tests.conftest import make_settings
from tests.integration.test_faults import write_cli_config

ROUTER_BIN = Path(sys.executable).parent / "dicom-router"


def rebuild(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROUTER_BIN), "--config", str(config), "projections", "rebuild",
                           "--all", *extra], capture_output=True, text=True, timeout=120)


def test_rebuild_refuses_while_a_router_serves_the_database(
        tmp_path: Path, database_url: str, start_router: Callable[..., Any]) -> None:
    settings = make_settings(tmp_path, database_url)
    router = start_router(settings)
    config = write_cli_config(tmp_path / "cli.toml", settings)

    refused = rebuild(config)
    assert refused.returncode == 3, refused.stderr
    assert "a router is running on" in refused.stderr and "--force" in refused.stderr
    assert "rebuilt" not in refused.stdout
    assert "password" not in refused.stderr.lower()

    forced = rebuild(config, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "rebuilding anyway (--force)" in forced.stderr
    assert forced.stdout.count("rebuilt ") == 3

    router.stop()
    after = rebuild(config)
    assert after.returncode == 0, after.stderr
    assert after.stdout.count("rebuilt ") == 3 and after.stderr == ""


def test_a_rebuild_holds_the_lock_against_a_starting_router(tmp_path: Path,
                                                            database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    rebuilding, serving, second = (ServingLock(settings) for _ in range(3))
    try:
        assert rebuilding.try_exclusive()
        assert not serving.try_shared()  # a router would wait
        rebuilding.release()
        assert serving.try_shared()
        assert second.try_shared()  # nodes share it
        assert not rebuilding.try_exclusive()
    finally:
        for lock in (rebuilding, serving, second):
            lock.release()
