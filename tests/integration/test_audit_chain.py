"""The audit trail's hash chain: ``dicom-router audit verify`` finds it intact on a router
that worked, then names the first broken link after a row is changed, deleted or added in
the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from projections.audit_chain import GENESIS, canonical, link
from router.application.commands import Actor
from router.application.sessions import AccessRecord
from router.cli import main
from tests.conftest import make_settings


def verify(capsys: Any, *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def execute(router: Any, sql: str, params: tuple[Any, ...] = ()) -> None:
    with router.view_db("audit").transaction() as cur:
        cur.execute(sql, params)


@pytest.fixture
def worked(database_url: str, tmp_path: Path, start_router: Any, monkeypatch: Any) -> Any:
    """A router with rows from every log: start, first admin, config, accesses, logins."""
    settings = make_settings(tmp_path, database_url)
    router = start_router(settings)
    admin = Actor("admin", "127.0.0.1")
    router.commands.put_destination({"name": "archive", "type": "file",
                                     "path": str(tmp_path / "archive")}, admin)
    for i in range(30):
        router.sessions.record(Actor("dr-who", "10.1.2.3"), AccessRecord(
            action="study.view", object_type="study", object_id=f"1.2.3.{i}",
            study_instance_uid=f"1.2.3.{i}", patient_id=f"PAT{i}"))
    router.runner.catch_up()
    monkeypatch.setenv("DICOM_ROUTER_DATABASE_URL", database_url)
    monkeypatch.setenv("DICOM_ROUTER_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("DICOM_ROUTER_SECRET_KEY", settings.secret_key or "")
    return router


def test_an_intact_trail_verifies_and_each_link_is_the_documented_hash(
        worked: Any, capsys: Any) -> None:
    db = worked.view_db("audit")
    count = db.query("SELECT COUNT(*) AS n FROM audit")[0]["n"]
    code, out = verify(capsys)
    assert code == 0, out
    assert re.search(rf"intact: {count} records checked", out)
    # The check is itself recorded, by cli, with what it found.
    worked.runner.catch_up()
    rows = db.query("SELECT actor, outcome, detail FROM audit WHERE action = 'audit.verify'")
    assert [(r["actor"], r["outcome"]) for r in rows] == [("cli", "success")]
    assert f"checked={count}" in rows[0]["detail"]
    rows = db.query("SELECT a.*, c.hash, c.seq, c.study_hashed, c.patient_hashed"
                    " FROM audit_chain c JOIN audit a ON"
                    " a.application = c.application AND a.position = c.position"
                    " ORDER BY c.seq")
    assert len(rows) == count + 1 >= 34  # and the verify's own row
    # docs/security.md: SHA-256 of the previous hash (hex) + the canonical JSON array.
    def flags(row: dict[str, Any]) -> tuple[bool, bool]:
        return bool(row["study_hashed"]), bool(row["patient_hashed"])

    first = rows[0]
    assert first["hash"] == hashlib.sha256(
        GENESIS.encode() + canonical(first, *flags(first))).hexdigest()
    assert canonical(first, *flags(first)).startswith(b'["admin",1,')
    assert all(rows[i]["hash"] == link(rows[i - 1]["hash"], rows[i], *flags(rows[i]))
               for i in range(1, len(rows)))
    views = [r for r in rows if r["action"] == "study.view"]
    assert all(flags(r) == (True, True) for r in views)  # their own study and patient


def test_a_changed_row_is_named_with_exit_code_1(worked: Any, capsys: Any) -> None:
    db = worked.view_db("audit")
    target = db.query("SELECT application, position, occurred_at FROM audit"
                      " WHERE action = 'study.view' ORDER BY position LIMIT 1 OFFSET 10")[0]
    execute(worked, "UPDATE audit SET patient_id = ? WHERE application = ? AND position = ?",
            ("SOMEONE-ELSE", target["application"], target["position"]))
    code, out = verify(capsys)
    assert code == 1, out
    assert f"record {target['application']}/{target['position']} " in out
    assert "does not match its hash" in out
    worked.runner.catch_up()
    found = db.query("SELECT outcome, detail FROM audit WHERE action = 'audit.verify'")
    assert found[0]["outcome"] == "failure"
    assert f"broken={target['application']}/{target['position']}" in found[0]["detail"]
    from projections.audit_queries import iso
    assert iso(target["occurred_at"]) in out
    # Checking only what came after it finds the rest intact.
    later = db.query("SELECT MIN(occurred_at) AS t FROM audit WHERE occurred_at > ?",
                     (target["occurred_at"],))[0]["t"]
    from datetime import UTC, datetime
    code, out = verify(capsys, "--from", datetime.fromtimestamp(later, UTC).isoformat())
    assert code == 0, out


def test_a_deleted_and_an_added_row_are_named(worked: Any, capsys: Any) -> None:
    db = worked.view_db("audit")
    rows = db.query("SELECT application, position FROM audit WHERE action = 'study.view'"
                    " ORDER BY position")
    gone = rows[3]
    execute(worked, "DELETE FROM audit WHERE application = ? AND position = ?",
            (gone["application"], gone["position"]))
    code, out = verify(capsys)
    assert code == 1 and f"record {gone['application']}/{gone['position']} " in out, out
    assert "was deleted" in out
    execute(worked, "DELETE FROM audit_chain WHERE application = ? AND position = ?",
            (gone["application"], gone["position"]))
    code, out = verify(capsys)
    assert code == 1 and "before it were deleted" in out, out


def test_a_row_added_by_hand_is_named(worked: Any, capsys: Any) -> None:
    execute(worked, "INSERT INTO audit (application, position, occurred_at, actor, source_ip,"
            " action, object_type, object_id, outcome) VALUES ('access', 999999, 1.0,"
            " 'mallory', '', 'study.view', 'study', 'x', 'success')")
    code, out = verify(capsys)
    assert code == 1 and "record access/999999 " in out and "not in the chain" in out, out


def test_bad_times_are_refused(worked: Any, capsys: Any) -> None:
    code, out = verify(capsys, "--from", "yesterday")
    assert code == 2 and "--from 'yesterday' is not an ISO 8601 time" in out
