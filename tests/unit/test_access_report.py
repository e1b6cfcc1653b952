"""The patient access report's folding, roles and CSV, and the audit view filling in the
patient of access rows that name only a study (whichever log is read first), on SQLite files
in tmp_path."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from projections import access_report_queries as report
from projections.audit import AuditView
from projections.audit_queries import AuditFilter, search
from projections.db import SqliteViews
from projections.runner import EventRecord
from router.domain.users import user_id

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER = "1.2.826.0.1.3680043.8.498.2"


def access(at: float, action: str, actor: str = "rad1", study: str = STUDY,
           outcome: str = "success", ip: str = "10.0.0.7") -> dict[str, Any]:
    return {"occurred_at": at, "actor": actor, "source_ip": ip, "action": action,
            "object_type": "study", "object_id": study, "outcome": outcome,
            "study_instance_uid": study, "detail": "{}", "position": int(at * 10)}


def viewer_session(start: float, frames: int) -> list[dict[str, Any]]:
    rows = [access(start, "viewer.open"), access(start + 1, "dicomweb.search"),
            access(start + 2, "dicomweb.metadata")]
    rows += [access(start + 3 + i * 0.5, "dicomweb.frames") for i in range(frames)]
    return rows


def test_one_viewer_session_with_60_frames_is_one_row_with_its_count() -> None:
    folded = report.fold(viewer_session(1000.0, 60))
    assert len(folded) == 1
    only = folded[0]
    assert (only.kind, only.count, only.actor, only.source_ip) == ("Viewer session", 63, "rad1",
                                                                  "10.0.0.7")
    assert only.actions["dicomweb.frames"] == 60 and only.last == 1000.0 + 3 + 59 * 0.5
    assert only.actions_text().startswith("dicomweb.frames x60")


def test_a_download_beside_a_viewer_session_and_a_later_session_are_rows_of_their_own() -> None:
    rows = viewer_session(1000.0, 5)
    rows += [access(1010.0, "dicomweb.retrieve"), access(1011.0, "dicomweb.retrieve")]
    rows += [access(1012.0, "study.view", actor="other"), access(1013.0, "dicomweb.frames",
                                                                 study=OTHER)]
    rows += viewer_session(1000.0 + report.SESSION_GAP + 100, 2)  # after the gap: a new one
    rows.append(access(5000.0, "ai.callback", actor="ai:cad"))  # a machine: not listed
    folded = report.fold(rows)
    assert [(a.kind, a.count, a.study_uid) for a in folded] == [
        ("Viewer session", 8, STUDY), ("DICOMweb retrieval", 2, STUDY),
        ("Study page", 1, STUDY), ("DICOMweb retrieval", 1, OTHER),
        ("Viewer session", 5, STUDY)]


def test_reads_of_another_user_or_long_after_are_not_folded_into_a_session() -> None:
    rows = [access(0.0, "viewer.open"), access(1.0, "dicomweb.frames", actor="rad2"),
            access(report.SESSION_GAP + 10.0, "dicomweb.frames")]
    assert [(a.actor, a.kind, a.count) for a in report.fold(rows)] == [
        ("rad1", "Viewer session", 1), ("rad2", "DICOMweb retrieval", 1),
        ("rad1", "DICOMweb retrieval", 1)]


def test_a_viewer_search_without_a_study_joins_the_users_viewer_session() -> None:
    rows = [access(0.0, "viewer.open"), access(1.0, "dicomweb.search", study=""),
            access(2.0, "dicomweb.search", study="", actor="rad2")]
    assert [(a.actor, a.kind, a.count) for a in report.fold(rows)] == [
        ("rad1", "Viewer session", 2), ("rad2", "Query (QIDO-RS)", 1)]


def test_failures_in_a_session_make_it_partial_and_a_second_address_is_kept() -> None:
    rows = [access(0.0, "viewer.open"), access(1.0, "dicomweb.frames", outcome="not_found"),
            access(2.0, "dicomweb.frames", ip="10.9.9.9")]
    only = report.fold(rows)[0]
    assert (only.outcome, only.failures, only.other_ips) == ("partial", 1, {"10.9.9.9"})


def test_the_role_is_the_one_held_at_the_time() -> None:
    changes = [(100.0, "radiologist"), (200.0, "operator")]
    assert report.role_when(changes, 150.0) == "radiologist"
    assert report.role_when(changes, 250.0) == "operator"
    assert report.role_when(changes, 50.0) == "radiologist"  # before the first: first known
    assert report.role_when([], 50.0) == ""


@pytest.fixture
def views(tmp_path: Path) -> Any:
    db = SqliteViews(tmp_path / "audit.sqlite")
    view = AuditView()
    with db.transaction() as cur:
        view.create(cur, "sqlite")
    yield db, view
    db.close()


def apply(views: Any, application: str, position: int, topic: str, at: float,
          **fields: Any) -> None:
    db, view = views
    fields.pop("timestamp", None)
    oid = fields.pop("oid", f"00000000-0000-0000-0000-{position:012d}")
    event = SimpleNamespace(originator_id=oid, originator_version=fields.pop("version", 1),
                            timestamp=datetime.fromtimestamp(at, UTC), **fields)
    record = EventRecord(application, position, topic, event)
    with db.transaction() as cur:
        view.apply(cur, record)


def received(views: Any, position: int, at: float, patient: str) -> None:
    apply(views, "ingest", position, "Job.Received", at, timestamp=at, actor="CT", source_ip="",
          index={"StudyInstanceUID": STUDY, "PatientID": patient}, source="dimse")


def opened(views: Any, position: int, at: float, actor: str = "rad1") -> None:
    apply(views, "access", position, "Access.Recorded", at, timestamp=at, actor=actor,
          source_ip="10.0.0.7", action="viewer.open", object_type="study", object_id=STUDY,
          outcome="success", study_instance_uid=STUDY, patient_id=None, detail="")


def patients(views: Any) -> list[Any]:
    db, _ = views
    return [r["patient_id"] for r in db.query(
        "SELECT patient_id FROM audit WHERE action = 'viewer.open' ORDER BY position")]


def test_a_viewer_open_gets_its_study_s_patient_whichever_log_is_read_first(views: Any) -> None:
    opened(views, 1, 10.0)  # the access log read first: no patient yet
    assert patients(views) == [None]
    received(views, 1, 5.0, "PAT-7")
    opened(views, 2, 20.0)  # read after the receipt
    assert patients(views) == ["PAT-7", "PAT-7"]


def test_the_report_reads_only_accesses_of_the_patient_with_each_user_s_role(views: Any) -> None:
    db, _ = views
    received(views, 1, 5.0, "PAT-7")
    apply(views, "admin", 1, "User.Created", 1.0, timestamp=1.0, actor="admin",
          source_ip="", name="rad1", role="radiologist", oid=str(user_id("rad1")))
    opened(views, 1, 10.0)
    opened(views, 2, 11.0, actor="AE_NOT_A_USER")
    rep = report.report(db, "PAT-7", 0.0, 100.0)
    assert [(a.actor, a.role, a.kind) for a in rep.accesses] == [
        ("rad1", "radiologist", "Viewer session"), ("AE_NOT_A_USER", "", "Viewer session")]
    assert report.report(db, "PAT-7", 10.5, 100.0).rows_read == 1  # the period applies
    assert report.report(db, "PAT-8", 0.0, 100.0).accesses == []
    text = report.csv_text(rep)
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == list(report.CSV_COLUMNS) and len(lines) == 3
    assert lines[1][2:6] == ["rad1", "radiologist", "10.0.0.7", "Viewer session"]


def test_the_report_query_uses_the_patient_and_time_index(views: Any) -> None:
    db, _ = views
    plan = db.query("EXPLAIN QUERY PLAN " + report._SELECT, ["P", 0.0, 1.0, 10])
    assert any("audit_patient_time" in str(dict(r)) for r in plan), [dict(r) for r in plan]


def test_csv_cells_are_neutralised() -> None:
    rep = report.Report("P", 0.0, 1.0, report.fold([access(0.0, "study.view",
                                                           actor="=cmd()")]), 1, False)
    assert "'=cmd()" in report.csv_text(rep)


def test_an_action_filter_may_list_several_actions_and_prefixes(views: Any) -> None:
    db, _ = views
    received(views, 1, 5.0, "PAT-7")
    opened(views, 1, 10.0)
    apply(views, "access", 2, "Access.Recorded", 11.0, timestamp=11.0, actor="rad1",
          source_ip="", action="study.view", object_type="study", object_id=STUDY,
          outcome="success", study_instance_uid=STUDY, patient_id="PAT-7", detail="")
    def actions(value: str) -> list[str]:
        flt = AuditFilter.from_query({"action": value})
        return sorted(r["action"] for r in search(db, flt, 50, 0)[0])
    assert actions("viewer.open,study.view") == ["study.view", "viewer.open"]
    assert actions("Job.*,viewer.open") == ["Job.Received", "viewer.open"]
    assert actions("study.view") == ["study.view"]
    assert actions("Job.*") == ["Job.Received"]
    with pytest.raises(ValueError, match="action"):
        AuditFilter.from_query({"action": " , "})
    assert json.loads(json.dumps(AuditFilter.from_query({"action": "a,b"}).query_params())) == {
        "action": "a,b"}


def test_unused_audit_indexes_are_dropped_and_searches_keep_theirs(tmp_path: Path) -> None:
    """The patient index is the (patient_id, occurred_at) one; the prefix-only index that
    older versions made is dropped, since every search by patient can use the longer one. The
    index on the exact actor is dropped too: searches by user compare lower(actor)."""
    import sqlite3

    from projections.audit import INDEXES

    conn = sqlite3.connect(tmp_path / "v.sqlite")
    conn.execute("CREATE TABLE audit (patient_id TEXT, occurred_at REAL, study_instance_uid TEXT,"
                 " actor TEXT, action TEXT, object_id TEXT, job_id TEXT)")
    conn.execute("CREATE TABLE audit_jobs (job_id TEXT, study_instance_uid TEXT)")
    conn.execute("CREATE INDEX audit_patient ON audit (patient_id)")  # an older version's
    conn.execute("CREATE INDEX audit_actor ON audit (actor)")  # and another
    for statement in INDEXES:
        conn.execute(statement)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "audit_patient" not in names and "audit_patient_time" in names
    assert "audit_actor" not in names and "audit_actor_lower" in names
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT * FROM audit WHERE lower(actor) = lower(?)",
                        ("Alice",)).fetchall()
    assert "audit_actor_lower" in str(plan), plan
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT * FROM audit WHERE patient_id = ?",
                        ("P1",)).fetchall()
    assert "audit_patient_time" in str(plan), plan
