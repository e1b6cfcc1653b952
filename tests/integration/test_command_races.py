"""An operator's requeue or cancel racing the dispatcher: the dispatcher records an attempt
between the command's read and its save. The command reads again and decides on what is
stored now; it never fails with a version conflict (a 500 in the API before), and a delivery
that has just arrived is not requeued or cancelled. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.application.commands import Actor, CommandError
from router.service import Router
from tests.conftest import outdated_on_next_read, wait_for
from tests.integration.peers import free_port
from tests.integration.test_faults import (
    c_store,
    dicom_destination,
    fast_retries,
    jobs,
    router_settings,
)
from tests.synthetic import make_ct_series

pytestmark = pytest.mark.usefixtures("dcmtk")


def _retrying(tmp_path: Path, database_url: str,
              start_router: Callable[..., Router]) -> tuple[Router, str]:
    """A router whose one delivery failed once and waits an hour for its next attempt."""
    settings = fast_retries(router_settings(
        tmp_path, database_url, [dicom_destination("dead", free_port(), timeout=2.0)]), 3600.0)
    router = start_router(settings)
    files = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
    assert c_store(router.dicom.port, files) == [0]
    row = wait_for(lambda: jobs(router, "SELECT job_id FROM deliveries WHERE status = "
                                        "'retrying' AND attempts = 1"), 20, "a failed attempt")
    return router, row[0]["job_id"]


def _race_on_read(router: Router, concurrent: Callable[[Any], None]) -> None:
    """The command's next read hands out a copy that the 'dispatcher' then outdates."""
    outdated_on_next_read(router.commands, "_get_delivery", concurrent,
                          router.stores.delivery.save)


def _attempt_failed(delivery: Any) -> None:
    delivery.fail_attempt(actor="system", source_ip="", correlation_id="", attempt=2,
                          error="connection refused", retry_at=time.time() + 3600,
                          duration_ms=1, node="", transforms=[])


def _succeeded(delivery: Any) -> None:
    delivery.succeed(actor="system", source_ip="", correlation_id="", attempt=2,
                     detail="stored", duration_ms=1, node="", transforms=[])


def _stored(router: Router, job_id: str) -> Any:
    return router.commands._get_delivery(job_id, "dead")


def test_requeue_lands_on_top_of_an_attempt_recorded_meanwhile(
        tmp_path: Path, database_url: str, start_router: Callable[..., Router]) -> None:
    router, job_id = _retrying(tmp_path, database_url, start_router)
    _race_on_read(router, _attempt_failed)
    router.commands.requeue(job_id, "dead", Actor("tester"))
    stored = _stored(router, job_id)
    assert (stored.status, stored.attempts) == ("pending", 2)


def test_cancel_after_an_arrival_recorded_meanwhile_is_refused_for_what_it_is(
        tmp_path: Path, database_url: str, start_router: Callable[..., Router]) -> None:
    router, job_id = _retrying(tmp_path, database_url, start_router)
    _race_on_read(router, _succeeded)
    with pytest.raises(CommandError, match="delivery is delivered; nothing to cancel"):
        router.commands.cancel(job_id, "dead", Actor("tester"), reason="not needed")
    assert _stored(router, job_id).status == "delivered"


def test_a_bulk_batch_falls_back_to_one_by_one_when_the_dispatcher_raced_it(
        tmp_path: Path, database_url: str, start_router: Callable[..., Router]) -> None:
    """change_many saves a batch at once; a conflict on one delivery (here: it arrived
    meanwhile) makes it decide each again on what is stored now."""
    router, job_id = _retrying(tmp_path, database_url, start_router)
    _race_on_read(router, _succeeded)
    done, skipped = router.commands.change_many("cancel", [(job_id, "dead")],
                                                Actor("tester"), "bulk")
    assert (done, skipped) == (0, 1)
    assert _stored(router, job_id).status == "delivered"
