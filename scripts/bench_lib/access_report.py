"""How long the patient access report takes on a large audit view: fills a fresh audit
table (the view's own schema and indexes) with ``--rows`` synthetic rows, most of them
receipts and deliveries, the rest accesses (viewer sessions of 60 frame reads, study pages,
downloads), then times the report of one patient and prints the query plan.

    .venv/bin/python -m scripts.bench_lib.access_report [--rows 1000000] [--backend postgres]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from projections import access_report_queries as access_report
from projections.audit import AuditView
from projections.db import PostgresViews, SqliteViews, ViewDatabase
from scripts.bench_lib import pgdb

PER_PATIENT = 100  # rows per patient: about 70 receipts/deliveries, 30 accesses
MACHINE = ("Job.Received", "Job.Routed", "Delivery.Created", "Delivery.Succeeded",
           "Delivery.AttemptFailed")
_INSERT = ("INSERT INTO audit (application, position, occurred_at, actor, source_ip, action,"
           " object_type, object_id, outcome, correlation_id, study_instance_uid, patient_id,"
           " detail, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def patient_rows(n: int, start: float, rng: random.Random) -> Iterator[tuple[Any, ...]]:
    """One patient's rows: receipts and deliveries, then a viewer session, a page, a download."""
    patient, study = f"P{n:07d}", f"1.2.826.0.1.3680043.9.{n}"
    at = start + n * 60.0
    for i in range(70):
        yield ("ingest" if i % 2 else "delivery", MACHINE[i % len(MACHINE)], "CT_SCANNER",
               at + i * 0.1, patient, study, "{}")
    at += 3600.0 * rng.random()
    yield ("access", "viewer.open", "rad1", at, patient, study, '{"detail": "OHIF"}')
    for i in range(27):
        yield ("access", "dicomweb.frames", "rad1", at + 1 + i * 0.2, patient, study, "{}")
    yield ("access", "study.view", "rad2", at + 600, patient, study, "{}")
    yield ("access", "dicomweb.retrieve", "script", at + 900, patient, study, "{}")


def fill(db: ViewDatabase, rows: int, dialect: str) -> float:
    """Create the view's tables and insert ``rows`` rows; seconds taken."""
    began = time.perf_counter()
    with db.transaction() as cur:
        AuditView().create(cur, dialect)
    rng = random.Random(7)
    positions = {"ingest": 0, "delivery": 0, "access": 0}
    batch: list[tuple[Any, ...]] = []
    for n in range(rows // PER_PATIENT):
        for app, action, actor, at, patient, study, detail in patient_rows(n, 1.7e9, rng):
            positions[app] += 1
            batch.append((app, positions[app], at, actor, "10.0.0.7", action, "study",
                          study, "success", None, study, patient, detail, None))
        if len(batch) >= 20_000:
            with db.transaction() as cur:
                cur.executemany(_INSERT, batch)
            batch.clear()
    if batch:
        with db.transaction() as cur:
            cur.executemany(_INSERT, batch)
    if dialect == "postgres":
        with db.transaction() as cur:
            cur.execute("ANALYZE audit")
    return time.perf_counter() - began


def measure(db: ViewDatabase, rows: int, repeats: int = 30) -> dict[str, Any]:
    rng = random.Random(11)
    patients = [f"P{rng.randrange(rows // PER_PATIENT):07d}" for _ in range(repeats)]
    times = []
    for patient in patients:
        began = time.perf_counter()
        rep = access_report.report(db, patient, 0.0, 4e9)
        times.append((time.perf_counter() - began) * 1000)
        assert [a.count for a in rep.accesses] == [28, 1, 1], rep.accesses
    return {"report_ms_median": round(statistics.median(times), 2),
            "report_ms_max": round(max(times), 2), "repeats": repeats}


def plan(db: ViewDatabase, dialect: str) -> list[str]:
    prefix = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN "
    found = db.query(prefix + access_report._SELECT, ["P0000001", 0.0, 4e9, 10])
    return [" ".join(str(v) for v in dict(r).values()) for r in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.backend == "sqlite":
            db: ViewDatabase = SqliteViews(Path(folder) / "audit.sqlite")
            dialect, name = "sqlite", ""
        else:
            name, url = pgdb.create(pgdb.admin_url(), "access_report")
            db, dialect = PostgresViews(url), "postgres"
        try:
            filled = fill(db, args.rows, dialect)
            result = {"backend": args.backend, "rows": args.rows,
                      "fill_s": round(filled, 1), **measure(db, args.rows),
                      "plan": plan(db, dialect)}
        finally:
            db.close()
            if name:
                pgdb.drop(name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
