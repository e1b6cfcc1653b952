"""Series- and study-level routing with real peers (storescu in, a folder out) and an injected
clock: a study waits for its quiet time, goes out whole, a late instance goes out alone as an
amendment, the expected count dispatches at once, and held units survive a restart. Runs on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.service import Router
from tests.conftest import make_settings, wait_for
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series

pytestmark = pytest.mark.dcmtk


class Clock:
    """Real time plus an offset the test moves forward (no multi-minute sleeps)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def rewind(self) -> None:
        """Back to real time: arrivals are timestamped with real time, so before sending
        more the test's jump forward is undone (else they would be "old" on arrival)."""
        self.offset = 0.0


def _config(tmp_path: Path, archive: Path, rule_extra: str) -> Path:
    archive.mkdir(exist_ok=True)
    path = tmp_path / "router.toml"
    path.write_text(f"""
[[destinations]]
name = "archive"
type = "file"
path = "{archive}"
template = "{{SeriesInstanceUID}}/{{SOPInstanceUID}}.dcm"

[[rules]]
name = "whole studies"
destinations = ["archive"]
{rule_extra}
""")
    return path


@pytest.fixture
def routers(tmp_path: Path, dcmtk: None) -> Iterator[Callable[..., Router]]:
    started: list[Router] = []

    def start(settings: Any, clock: Clock) -> Router:
        router = Router.build(settings, clock=clock)
        router.start()
        started.append(router)
        return router

    yield start
    for router in started:
        if router.ready:
            router.stop()


def _units(router: Router) -> list[dict[str, Any]]:
    return router.view_db("jobs").query("SELECT * FROM units ORDER BY first_at")


def _statuses(router: Router) -> list[str]:
    return sorted(r["status"] for r in router.view_db("jobs").query(
        "SELECT status FROM deliveries WHERE destination = 'archive'"))


def _delivered(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def test_study_waits_for_quiet_time_then_late_instance_is_an_amendment(
        tmp_path: Path, database_url: str, routers: Callable[..., Router]) -> None:
    archive = tmp_path / "archive"
    config = _config(tmp_path, archive, 'granularity = "study"')
    clock = Clock()
    router = routers(make_settings(tmp_path, database_url, config), clock)
    files = make_ct_series(tmp_path / "ct", count=4, rows=16, cols=16)
    storescu(router.dicom.port, files[:3])
    wait_for(lambda: _statuses(router) == ["held"] * 3, 10, "three held deliveries")
    unit = _units(router)[0]
    assert (unit["granularity"], unit["quiet_time"], unit["pending_count"]) == ("study", 180, 3)
    time.sleep(1.0)  # several scheduler ticks: nothing may leave before the quiet time
    assert _delivered(archive) == []
    clock.advance(181)
    wait_for(lambda: len(_delivered(archive)) == 3, 20, "the study delivered as a whole")
    unit = wait_for(lambda: [u for u in _units(router) if u["dispatched_at"]], 10, "unit")[0]
    assert unit["dispatch_reason"] == "quiet_time" and unit["pending_count"] == 0
    first_times = {p.name: p.stat().st_mtime_ns for p in _delivered(archive)}

    clock.rewind()
    storescu(router.dicom.port, files[3:])  # arrives after its study was dispatched
    wait_for(lambda: _statuses(router).count("held") == 1, 10, "the late instance held")
    time.sleep(0.6)
    assert len(_delivered(archive)) == 3  # an amendment waits for its own quiet time too
    clock.advance(181)
    wait_for(lambda: len(_delivered(archive)) == 4, 20, "the amendment delivered")
    assert {p.name: p.stat().st_mtime_ns for p in _delivered(archive)
            if p.name in first_times} == first_times  # the unit was not sent again
    members = router.view_db("jobs").query(
        "SELECT release_kind, count(*) AS n FROM unit_members GROUP BY release_kind")
    assert {m["release_kind"]: m["n"] for m in members} == {"dispatched": 3, "amendment": 1}
    wait_for(lambda: _statuses(router) == ["delivered"] * 4, 10, "all delivered")
    assert _units(router)[0]["amended_count"] == 1


def test_expected_count_dispatches_before_the_quiet_time(
        tmp_path: Path, database_url: str, routers: Callable[..., Router]) -> None:
    archive = tmp_path / "archive"
    config = _config(tmp_path, archive,
                     'granularity = "series"\nquiet_time = "1h"\nexpected_count = 3')
    router = routers(make_settings(tmp_path, database_url, config), Clock())
    files = make_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
    storescu(router.dicom.port, files)
    wait_for(lambda: len(_delivered(archive)) == 3, 20, "the series delivered when complete")
    unit = _units(router)[0]
    assert unit["dispatch_reason"] == "expected_count" and unit["granularity"] == "series"


def test_series_units_are_dispatched_separately(
        tmp_path: Path, database_url: str, routers: Callable[..., Router]) -> None:
    archive = tmp_path / "archive"
    config = _config(tmp_path, archive, 'granularity = "series"\nquiet_time = "30s"')
    clock = Clock()
    router = routers(make_settings(tmp_path, database_url, config), clock)
    first = make_ct_series(tmp_path / "a", count=2, rows=16, cols=16)
    storescu(router.dicom.port, first)
    wait_for(lambda: _statuses(router) == ["held"] * 2, 10, "first series held")
    clock.advance(31)
    wait_for(lambda: len(_delivered(archive)) == 2, 20, "first series delivered")
    second = make_ct_series(tmp_path / "b", count=2, rows=16, cols=16)
    clock.rewind()
    storescu(router.dicom.port, second)
    wait_for(lambda: _statuses(router).count("held") == 2, 10, "second series held")
    time.sleep(0.6)
    assert len(_delivered(archive)) == 2  # its own quiet time has not passed
    clock.advance(31)
    wait_for(lambda: len(_delivered(archive)) == 4, 20, "second series delivered")
    assert len(_units(router)) == 2


def test_held_study_survives_a_restart(
        tmp_path: Path, database_url: str, routers: Callable[..., Router]) -> None:
    archive = tmp_path / "archive"
    config = _config(tmp_path, archive, 'granularity = "study"\nquiet_time = "2m"')
    settings = make_settings(tmp_path, database_url, config)
    files = make_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
    clock = Clock()
    first = routers(settings, clock)
    storescu(first.dicom.port, files[:2])
    wait_for(lambda: _statuses(first) == ["held"] * 2, 10, "two held")
    first.stop()
    assert _delivered(archive) == []

    second = routers(settings, clock)
    storescu(second.dicom.port, files[2:])
    wait_for(lambda: _statuses(second) == ["held"] * 3, 10, "three held after the restart")
    clock.advance(121)
    wait_for(lambda: len(_delivered(archive)) == 3, 20, "the whole study delivered")
    unit = _units(second)[0]
    assert unit["total_count"] == 3 and unit["amended_count"] == 0
