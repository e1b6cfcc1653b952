"""Every ATNA audit message the router builds validates against the DICOM audit message
schema (PS3.15 A.5.1, docs/schema/dicom-audit-message.rnc) and carries the standard codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from router.atna.messages import Source, message_for
from router.atna.syslog import frame, rfc5424

SCHEMA_FILE = Path(__file__).parents[2] / "docs" / "schema" / "dicom-audit-message.rnc"
SOURCE = Source("DICOMROUTER", "DICOMROUTER", "node-1", "Site A")


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    # The standard's text ends some lines with "##" documentation comments, which the compact
    # syntax allows only before a pattern; as plain comments they mean the same.
    return etree.RelaxNG.from_rnc_string(SCHEMA_FILE.read_text().replace("##", "#"))


def row(action: str, **overrides: Any) -> dict[str, Any]:
    detail = overrides.pop("detail", {})
    base = {"application": "access", "position": 7, "occurred_at": 1765080000.25,
            "actor": "dr-who", "source_ip": "10.1.2.3", "action": action,
            "object_type": "study", "object_id": "1.2.3", "outcome": "success",
            "correlation_id": "c", "study_instance_uid": "1.2.3", "patient_id": "PAT1",
            "detail": json.dumps(detail), "job_id": None}
    base.update(overrides)
    return base


# action -> (EventID, EventTypeCode or None, EventActionCode, outcome)
CASES = {
    "NodeActivity.Started": ("110100", "110120", "E", "0"),
    "NodeActivity.Stopped": ("110100", "110121", "E", "0"),
    "Job.Received": ("110104", None, "C", "0"),
    "ReceiptFailure.Recorded": ("110104", None, "C", "4"),
    "Delivery.Created": ("110102", None, "E", "0"),
    "Delivery.Succeeded": ("110104", None, "R", "0"),
    "Delivery.AttemptFailed": ("110104", None, "R", "4"),
    "Delivery.DeadLettered": ("110104", None, "R", "8"),
    "Job.BlobPurged": ("110105", None, "D", "0"),
    "study.view": ("110103", None, "R", "0"),
    "dicomweb.retrieve": ("110103", None, "R", "0"),
    "study.store": ("110103", None, "C", "0"),
    "dimse.move": ("110102", None, "E", "0"),
    "dimse.find": ("110112", None, "E", "0"),
    "dicomweb.search": ("110112", None, "E", "0"),
    "Session.Started": ("110114", "110122", "E", "0"),
    "Session.Ended": ("110114", "110123", "E", "0"),
    "LoginFailure.Recorded": ("110114", "110122", "E", "4"),
    "access.denied": ("110113", "110132", "E", "4"),
    "AssociationRefusal.Recorded": ("110113", "110126", "E", "4"),
    "User.RoleChanged": ("110113", "110136", "E", "0"),
    "User.Created": ("110113", "110137", "E", "0"),
    "Destination.Updated": ("110113", "110128", "E", "0"),
    "RemoteNode.Created": ("110113", "110128", "E", "0"),
    "Rule.Created": ("110113", "110131", "E", "0"),
    "RuntimeSettings.Changed": ("110113", "110131", "E", "0"),
    "audit.search": ("110101", None, "R", "0"),
    "audit.export": ("110106", None, "R", "0"),
    "audit.access_report_export": ("110106", None, "R", "0"),
    "audit.access_report": ("110101", None, "R", "0"),
    "study.export": ("110106", None, "R", "0"),
    "instance.view": ("110103", None, "R", "0"),
    "transfer.view": ("110103", None, "R", "0"),
    "transfers.list": ("110112", None, "E", "0"),
    "transform.preview": ("110103", None, "R", "0"),
    "reidentification.lookup": ("110113", "110132", "E", "0"),
    "User.Unlocked": ("110113", "110137", "E", "0"),
    "Transform.Created": ("110113", "110131", "E", "0"),
    "Transform.Updated": ("110113", "110131", "E", "0"),
    "Transform.Deleted": ("110113", "110131", "E", "0"),
}
# Rows ATNA defines no event for (docs/atna.md, "Rows with no ATNA event are not sent").
NO_EVENT = {"Job.Routed", "Job.Rerouted", "Job.DuplicateIgnored", "Job.ConflictKept",
            "Instance.Registered", "Instance.VersionAdded", "Unit.Dispatched", "Unit.Amended",
            "Delivery.Requeued", "Delivery.Cancelled", "BulkAction.Requested",
            "Retrieve.Requested", "Retrieve.Progressed", "Retrieve.Completed",
            "Retrieve.Failed", "ai.callback", "dimse.commitment", "Commitment.Requested",
            "Commitment.Reported", "Commitment.ReportFailed", "Commitment.Abandoned",
            "Pseudonym.Recorded"}
FAILED = {"ReceiptFailure.Recorded", "Delivery.AttemptFailed", "Delivery.DeadLettered",
          "LoginFailure.Recorded"}


@pytest.mark.parametrize("action", sorted(CASES))
def test_each_mapped_row_gives_a_valid_message_with_the_standard_codes(
        schema: etree.RelaxNG, action: str) -> None:
    outcome = "denied" if action == "access.denied" else (
        "failure" if action in FAILED else "success")
    xml = message_for(row(action, outcome=outcome, detail={
        "reason": "wrong password", "destination": "pacs", "calling_aet": "CT_1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "name": "pacs"}), SOURCE,
        {"pacs": "dicom"})
    assert xml is not None
    doc = etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log
    event_id, type_code, action_code, indicator = CASES[action]
    ident = doc.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == event_id
    assert ident.find("EventID").get("codeSystemName") == "DCM"
    assert ident.get("EventActionCode") == action_code
    assert ident.get("EventOutcomeIndicator") == indicator
    assert ident.get("EventDateTime") == "2025-12-07T04:00:00.250000Z"
    types = [c.get("csd-code") for c in ident.findall("EventTypeCode")]
    assert types == ([type_code] if type_code else [])
    source = doc.find("AuditSourceIdentification")
    assert (source.get("AuditSourceID"), source.get("AuditEnterpriseSiteID")) == (
        "DICOMROUTER", "Site A")


def test_transfers_name_source_and_destination_roles_and_the_study_and_patient(
        schema: etree.RelaxNG) -> None:
    doc = etree.fromstring(message_for(row("Job.Received", actor="CT_1", detail={
        "calling_aet": "CT_1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}), SOURCE))
    roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code")
             for p in doc.findall("ActiveParticipant")}
    assert roles == {"CT_1": "110153", "DICOMROUTER": "110152"}
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get(
        "ParticipantObjectID") for o in doc.findall("ParticipantObjectIdentification")}
    assert objects == {"110180": "1.2.3", "2": "PAT1"}


def test_a_delivery_to_a_bucket_is_an_export_to_destination_media(
        schema: etree.RelaxNG) -> None:
    # A Delivery.Succeeded row names only the delivery: the sender adds its destination.
    xml = message_for(row("Delivery.Succeeded", object_id="d-1", destination="cloud",
                          detail={"attempt": 1}), SOURCE, {"cloud": "s3"})
    doc = etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log
    assert doc.find("EventIdentification/EventID").get("csd-code") == "110106"
    roles = [p.find("RoleIDCode").get("csd-code") for p in doc.findall("ActiveParticipant")]
    assert roles == ["110153", "110154"]


def test_hostile_strings_are_escaped_and_control_characters_replaced(
        schema: etree.RelaxNG) -> None:
    nasty = "<script>alert(1)</script>&\x00\x1b../../etc/passwd"
    xml = message_for(row("study.view", actor=nasty, patient_id=nasty,
                          study_instance_uid=nasty), SOURCE)
    assert b"<script>" not in xml
    doc = etree.fromstring(xml)  # well-formed XML
    assert schema.validate(doc), schema.error_log
    assert doc.find("ActiveParticipant").get("UserID").startswith("<script>alert(1)")


def test_every_action_the_audit_trail_names_is_mapped_or_known_to_have_no_event() -> None:
    """An action added to the audit trail's catalogue must be decided on here: sent (and
    which event) or not sent."""
    from web.pages.audit_actions import GROUPS, LABELS

    named = set(LABELS) | {value for _, choices in GROUPS for value, _ in choices
                           if "," not in value and "*" not in value}
    sent = {a for a in named if message_for(row(a), SOURCE) is not None}
    assert named - sent - NO_EVENT == set()
    assert sent & NO_EVENT == set()


def test_a_reidentification_names_the_patient_whose_identity_was_revealed(
        schema: etree.RelaxNG) -> None:
    doc = etree.fromstring(message_for(row(
        "reidentification.lookup", object_type="pseudonym", object_id="trial-7/patient/X9",
        detail={"detail": "project trial-7; reason: adverse event"}), SOURCE))
    assert schema.validate(doc), schema.error_log
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get(
        "ParticipantObjectID") for o in doc.findall("ParticipantObjectIdentification")}
    assert objects == {"12": "pseudonym:trial-7/patient/X9", "110180": "1.2.3", "2": "PAT1"}


def test_rows_atna_has_no_event_for_give_no_message() -> None:
    for action in ("Job.Routed", "Unit.Dispatched", "Instance.Registered", "AIRequest.Accepted"):
        assert message_for(row(action), SOURCE) is None


def test_the_schema_refuses_what_it_should(schema: etree.RelaxNG) -> None:
    """The schema really checks: a message without its audit source is invalid."""
    doc = etree.fromstring(message_for(row("study.view"), SOURCE))
    doc.remove(doc.find("AuditSourceIdentification"))
    assert not schema.validate(doc)


def test_syslog_framing_is_rfc5424_with_octet_counting() -> None:
    message = rfc5424(b"<AuditMessage/>", "node-1", "dicom-router", "42", 1765080000.25)
    assert message == (b"<85>1 2025-12-07T04:00:00.250000Z node-1 dicom-router 42 "
                       b"IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage/>")
    assert frame(message) == b"%d " % len(message) + message
