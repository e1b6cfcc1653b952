"""A DICOM destination that serves one association at a time (DCMTK storescp without --fork,
like many PACS): the lane's second worker must not hold an instance hostage waiting for an
association the peer will not take, nor record a failed attempt against a destination that is
up and busy with our first association. Everything arrives on the first attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from router.service import Router
from tests.conftest import wait_for
from tests.integration.peers import free_port
from tests.integration.test_faults import (
    DcmtkStoreScp,
    audit,
    c_store,
    dicom_destination,
    fast_retries,
    jobs,
    router_settings,
    sop_uid_of,
    storescp_on,  # noqa: F401  (fixture)
)
from tests.synthetic import make_ct_series

pytestmark = pytest.mark.usefixtures("dcmtk")


def test_a_one_association_peer_gets_everything_on_the_first_attempt(
        tmp_path: Path, start_router: Callable[..., Router],
        storescp_on: Callable[[Path, int], DcmtkStoreScp]) -> None:  # noqa: F811
    port = free_port()
    scp = storescp_on(tmp_path / "pacs", port)
    # Two workers; the first keeps its association for 30 s, far beyond the 2 s timeout that
    # the second one's association request would wait in storescp's backlog.
    destination = dicom_destination("pacs", port, timeout=2.0, concurrency=2, idle_close=30.0)
    settings = fast_retries(router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                                            [destination]), 0.5, 3600.0)
    router = start_router(settings)
    files = make_ct_series(tmp_path / "ct", count=40, rows=64, cols=64)
    assert c_store(router.dicom.port, files) == [0] * len(files)

    wait_for(lambda: scp.sop_uids() == {sop_uid_of(p) for p in files}, 30,
             "storescp to hold every instance")

    def recorded() -> list[dict[str, object]]:
        rows = jobs(router, "SELECT status, attempts FROM deliveries")
        return rows if all(r["status"] == "delivered" for r in rows) else []

    rows = wait_for(recorded, 10, "every delivery recorded")
    assert len(rows) == len(files)
    assert {r["attempts"] for r in rows} == {1}
    router.runner.catch_up()
    assert audit(router, "SELECT 1 FROM audit WHERE action = 'Delivery.AttemptFailed'") == []
