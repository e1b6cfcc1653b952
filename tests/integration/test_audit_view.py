"""The audit view itself: a rebuild (reading the logs in another order and in other batch
sizes) gives identical rows, and no secret, password hash or token hash ever reaches it.
Runs on a router that received real DICOM, delivered it, and had its users and
configuration changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from projections import runner as runner_module
from projections.audit import AuditView
from projections.db import open_views
from projections.runner import drop_view, ensure_schema, process_batch
from router.application.commands import Actor
from router.application.sessions import AccessRecord
from router.application.stores import open_stores
from router.application.users import token_hash
from router.secrets import SecretBox, load_master_key
from tests.integration.test_web_audit import (
    AUDITOR,
    PATIENT,
    RADIOLOGIST,
    SECRET,
    Scene,
    start_scene,
)
from tests.web_harness import bearer

TABLES = ("audit", "audit_jobs", "audit_deliveries", "audit_names")
ORDER = {"audit": "application, position", "audit_jobs": "job_id",
         "audit_deliveries": "delivery_id", "audit_names": "object_id"}


class DeliveryFirstAuditView(AuditView):
    """The same view reading the delivery and access logs before ingest and admin."""

    follows = ("delivery", "access", "admin", "ingest")


class ForgetfulAuditView(DeliveryFirstAuditView):
    """Remembers at most one job and one delivery link: the rest is read back from its
    tables, and the rows must come out the same."""

    def __init__(self) -> None:
        super().__init__()
        self.links.LIMIT = 1


def change_things(scene: Scene) -> str:
    """Configuration, account and access events of every kind; returns an API token."""
    router = scene.router
    admin = Actor("admin", "127.0.0.1")
    bearer(scene.server.url, *AUDITOR)  # a session
    router.commands.put_rule({"name": "everything", "calling_aet": "MR_*",
                              "destinations": ["archive"]}, admin)
    router.commands.put_destination({
        "name": "cloud", "type": "s3", "bucket": "imaging2", "region": "us-east-1",
        "endpoint_url": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": SECRET + "-2"}, admin)
    router.commands.pause_destination("cloud", admin)
    router.users.set_role(RADIOLOGIST[0], "operator", admin)
    router.users.set_password(RADIOLOGIST[0], "another password 2", admin)
    token = router.users.create_token(AUDITOR[0], "siem export", admin)
    router.users.revoke_token(AUDITOR[0], token.token_id, admin)
    router.users.set_disabled(RADIOLOGIST[0], True, admin)
    router.sessions.record(Actor(AUDITOR[0], "10.0.0.5"), AccessRecord(
        action="study.view", object_type="study", object_id=scene.study,
        study_instance_uid=scene.study, patient_id=PATIENT))
    router.users.record_login_failure("mallory", "10.6.6.6", "unknown user")
    router.runner.catch_up()
    return token.value


def table_rows(db: Any, table: str) -> list[dict[str, Any]]:
    return db.query(f"SELECT * FROM {table} ORDER BY {ORDER[table]}")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_rebuild_in_any_log_order_and_batch_size_gives_identical_rows(
    database_url: str, web_router: Any, tmp_path: Path, dcmtk: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scene = start_scene(web_router, tmp_path, database_url)
    change_things(scene)
    settings = scene.router.settings
    scene.router.stop()  # flushes the views: the live rows are complete
    stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                             settings.data_dir)))
    db = open_views(settings.database_url, "audit")
    try:
        live = {table: table_rows(db, table) for table in TABLES}
        assert len(live["audit"]) >= 5 * 7 + 10  # 7 rows per instance, config and accounts
        actions = {row["action"] for row in live["audit"]}
        assert {"Job.Received", "Delivery.AttemptFailed", "Rule.Updated", "User.RoleChanged",
                "study.view", "LoginFailure.Recorded",
                "Session.Started"} <= actions
        for view, batch in ((AuditView(), 500), (DeliveryFirstAuditView(), 3),
                            (ForgetfulAuditView(), 7)):
            monkeypatch.setattr(runner_module, "BATCH_SIZE", batch)
            drop_view(view, db)
            ensure_schema(view, db)
            while process_batch(view, db, stores.all()):
                pass
            rebuilt = {table: table_rows(db, table) for table in TABLES}
            assert rebuilt == live, f"{type(view).__name__} with batches of {batch}"
        # Delivery rows found their study although their log was read first.
        deliveries = [r for r in live["audit"] if r["action"].startswith("Delivery.")]
        assert deliveries and all(r["study_instance_uid"] for r in deliveries)
    finally:
        db.close()
        stores.close()


@pytest.mark.dcmtk
@pytest.mark.slow
def test_no_secret_password_hash_or_token_hash_reaches_the_audit_view(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")
    token = change_things(scene)
    admin_log = scene.router.stores.admin
    stored = [admin_log.mapper.to_domain_event(n)
              for n in admin_log.recorder.select_notifications(0, 10000)]
    # What must never show: every password and token hash, every sealed value, the secrets.
    forbidden = {SECRET, SECRET + "-2", token, token_hash(token), "enc:v1:", "$2b$",
                 "password_hash", "token_hash", AUDITOR[1], RADIOLOGIST[1]}
    for event in stored:
        for field in ("password_hash", "token_hash"):
            if getattr(event, field, None):
                forbidden.add(str(getattr(event, field)))
        config = getattr(event, "config", None) or {}
        forbidden |= {str(v) for k, v in config.items() if k == "secret_access_key"}
    assert any(str(getattr(e, "password_hash", "")).startswith("$2b$") for e in stored)
    assert any(str(e.config.get("secret_access_key", "")).startswith("enc:v1:")
               for e in stored if hasattr(e, "config"))
    db = scene.router.view_db("audit")
    for table in TABLES:
        for row in table_rows(db, table):
            text = json.dumps(row, default=str)
            leaked = [f for f in forbidden if f and f in text]
            assert not leaked, (table, row.get("action", row))
    # The changes are there, described without their secrets.
    rows = db.query("SELECT action, detail FROM audit WHERE application = 'admin'")
    details = {r["action"]: json.loads(r["detail"]) for r in rows}
    assert details["User.ApiTokenCreated"]["label"] == "siem export"
    assert details["User.RoleChanged"] == {"name": RADIOLOGIST[0], "role": "operator",
                                           "version": 2}
    assert details["User.PasswordChanged"]["name"] == RADIOLOGIST[0]
    assert details["Destination.Updated"]["type"] == "s3"
    assert details["Rule.Updated"]["destinations"] == ["archive"]
