"""How fast the transfers list (projections/transfers_queries.py) reads a large jobs view.

Fills a fresh jobs view (the real schema and indexes, projections/jobs.py) with generated
rows: ``--instances`` receipts in studies of ``--per-study`` instances (3 series each) from
4 senders, each routed to 2 destinations (mostly delivered; 1 study in 50 retrying, 1 in 100
with failed deliveries), then times each read of the jobs page and the API (best and median
of ``--repeat`` runs, milliseconds).

    .venv/bin/python -m scripts.bench_lib.transfers                       # SQLite, 100k
    .venv/bin/python -m scripts.bench_lib.transfers --database-url postgresql://...

The PostgreSQL database must be empty (the script creates the view's tables in it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from projections.db import ViewDatabase, open_views
from projections.jobs import JobsView
from projections.runner import ensure_schema
from projections.study_keys import transfer_id
from projections.transfers_queries import (
    TransferFilters,
    list_transfers,
    series_instances,
    transfer_series,
)

JOB_INSERT = (
    "INSERT INTO jobs (job_id, received_at, source, actor, source_ip, calling_aet, called_aet,"
    " sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid, modality,"
    " patient_id, sha256, size, transfer_syntax_uid, routing, transfer_id, patient_name,"
    " study_description, study_date, series_number, instance_number)"
    " VALUES (?, ?, 'dicom', 'CT_1', '10.0.0.1', ?, 'DICOMROUTER', '1.2.840.10008.5.1.4.1.1.2',"
    " ?, ?, ?, 'CT', ?, 'x', 500000, '1.2.840.10008.1.2.1', 'routed', ?, ?, 'CT CHEST',"
    " '20261207', ?, ?)"
)
DELIVERY_INSERT = (
    "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts, created_at,"
    " transfer_id) VALUES (?, ?, ?, ?, 1, ?, ?)"
)
TRANSFER_INSERT = (
    "INSERT INTO transfers (transfer_id, study_instance_uid, study_uid_derived, calling_aet,"
    " patient_name, patient_id, study_description, study_date, modality, receipts,"
    " first_received_at, last_received_at) VALUES (?, ?, 0, ?, ?, ?, 'CT CHEST', '20261207',"
    " 'CT', ?, ?, ?)"
)


def fill(db: ViewDatabase, instances: int, per_study: int) -> dict[str, Any]:
    """Generated rows; returns one transfer id and one of its series for the detail reads."""
    start = time.time() - instances  # one receipt a second, oldest first
    sample: dict[str, Any] = {}
    for study_no in range(instances // per_study):
        study = f"1.2.826.0.1.3680043.10.999.{study_no}"
        sender = f"CT_{study_no % 4}"
        tid = transfer_id(study, sender)
        status = ("retrying" if study_no % 50 == 7 else "dead" if study_no % 100 == 3
                  else "delivered")
        jobs, deliveries = [], []
        for n in range(per_study):
            job = str(uuid.uuid4())
            at = start + study_no * per_study + n
            series = f"{study}.{n % 3}"
            jobs.append((job, at, sender, f"{study}.{n % 3}.{n}", study, series,
                         f"PID{study_no}", tid, f"PATIENT^{study_no}", n % 3, n))
            for destination in ("pacs", "archive"):
                state = status if destination == "pacs" and n % 10 == 0 else "delivered"
                deliveries.append((str(uuid.uuid4()), job, destination, state, at, tid))
        with db.transaction() as cur:
            cur.executemany(JOB_INSERT, jobs)
            cur.executemany(DELIVERY_INSERT, deliveries)
            cur.execute(TRANSFER_INSERT, (tid, study, sender, f"PATIENT^{study_no}",
                                          f"PID{study_no}", per_study, jobs[0][1], jobs[-1][1]))
        sample = {"transfer_id": tid, "series": f"{study}.0"}
    if db.dialect == "postgres":
        with db.transaction() as cur:
            cur.execute("ANALYZE")
    return sample


def timed(read: Callable[[], Any], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        read()
        runs.append((time.perf_counter() - began) * 1000)
    return min(runs), statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--per-study", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = args.database_url or f"sqlite:///{Path(folder)}"
        db = open_views(url, "jobs")
        view = JobsView()
        ensure_schema(view, db)
        began = time.perf_counter()
        sample = fill(db, args.instances, args.per_study)
        print(f"{db.dialect}: {args.instances} instances in {args.instances // args.per_study}"
              f" transfers, filled in {time.perf_counter() - began:.1f} s")
        reads: dict[str, Callable[[], Any]] = {
            "page 1 (50 transfers, no filter)":
                lambda: list_transfers(db, TransferFilters(), 50, 0),
            "page 20": lambda: list_transfers(db, TransferFilters(), 50, 950),
            "status=failed": lambda: list_transfers(db, TransferFilters(status="failed"), 50, 0),
            "status=delivered":
                lambda: list_transfers(db, TransferFilters(status="delivered"), 50, 0),
            "destination=pacs":
                lambda: list_transfers(db, TransferFilters(destination="pacs"), 50, 0),
            "calling_aet=CT_1": lambda: list_transfers(db, TransferFilters(calling_aet="CT_1"),
                                                       50, 0),
            "one transfer's series": lambda: transfer_series(db, sample["transfer_id"]),
            "one series' instances":
                lambda: series_instances(db, sample["transfer_id"], sample["series"]),
        }
        for name, read in reads.items():
            best, median = timed(read, args.repeat)
            print(f"  {name:34} best {best:8.1f} ms   median {median:8.1f} ms")
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
