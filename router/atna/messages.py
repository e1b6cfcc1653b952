"""DICOM audit messages (PS3.15 A.5) from rows of the audit view.

:func:`message_for` maps one audit row to the ``AuditMessage`` XML of the ATNA event it stands
for, or None for rows ATNA has no event for (routing decisions, unit timers...). The mapping
table is in docs/atna.md; the codes are those of PS3.16 (CID 400-405) and PS3.15 A.5.
Every generated message validates against the schema of PS3.15 A.5.1
(docs/schema/dicom-audit-message.rnc; tests/unit/test_atna_messages.py).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Coded values: (code, code system, meaning).
Code = tuple[str, str, str]
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
AUDIT_LOG_USED: Code = ("110101", "DCM", "Audit Log Used")
BEGIN_TRANSFERRING: Code = ("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
EXPORT: Code = ("110106", "DCM", "Export")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
# Event type codes (CID 401, 403, 404).
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
LOGOUT: Code = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION: Code = ("110128", "DCM", "Network Configuration")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
SECURITY_ROLES_CHANGED: Code = ("110136", "DCM", "Security Roles Changed")
USER_SECURITY_CHANGED: Code = ("110137", "DCM", "User Security Attributes Changed")
# Role ID codes (CID 402).
APPLICATION: Code = ("110150", "DCM", "Application")
APPLICATION_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION_MEDIA: Code = ("110154", "DCM", "Destination Media")
# Participant object ID type codes (RFC 3881 and CID 404).
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
USER_IDENTIFIER: Code = ("11", "RFC-3881", "User Identifier")
URI: Code = ("12", "RFC-3881", "URI")
STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")
NODE_ID: Code = ("110182", "DCM", "Node ID")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

OUTCOME = {"success": "0", "failure": "4", "denied": "4", "not_found": "4"}
# XML 1.0 refuses these characters even escaped; a received AE title or reason may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_ACCESSES = ("study.view", "instance.view", "viewer.open", "job.view", "dicomweb.retrieve",
             "dicomweb.metadata", "dicomweb.frames", "dicomweb.bulkdata", "dicomweb.rendered",
             "dicomweb.thumbnail", "wado.retrieve", "job.dry_run", "remote.retrieve.view",
             "transfer.view", "transform.preview")
_QUERIES = ("studies.search", "dicomweb.search", "dimse.find", "remote.find", "jobs.list",
            "remote.retrieves", "transfers.list")
_USERS = ("User.Created", "User.PasswordChanged", "User.Disabled", "User.Enabled",
          "User.ApiTokenCreated", "User.ApiTokenRevoked", "User.Unlocked")
_NETWORK = ("Destination.", "RemoteNode.")
_SOFTWARE = ("Rule.", "RuntimeSettings.", "Transform.")


@dataclass(frozen=True)
class Source:
    """Who reports: AuditSourceIdentification, and the router as an active participant."""

    audit_source_id: str  # the AE title unless configured
    ae_title: str
    host: str  # this node's name, the router's NetworkAccessPointID
    enterprise_site_id: str = ""


def message_for(row: dict[str, Any], source: Source,
                destination_types: dict[str, str] | None = None) -> bytes | None:
    """The AuditMessage XML (UTF-8) for an audit row, or None when ATNA defines no event
    for it. ``destination_types`` maps destination names to their kind (``dicom``, ``s3``,
    ...): a delivery to a DICOM node is a transfer, to anything else an export."""
    built = _Builder(row, source, destination_types or {})
    root = built.build()
    if root is None:
        return None
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


class _Builder:
    def __init__(self, row: dict[str, Any], source: Source, types: dict[str, str]) -> None:
        self.row = row
        self.source = source
        self.types = types
        self.action: str = row["action"]
        self.detail = _detail(row.get("detail"))
        self.root = ET.Element("AuditMessage")

    def build(self) -> ET.Element | None:
        handler = self._handler()
        if handler is None:
            return None
        handler()
        return self.root

    def _handler(self) -> Any:
        a = self.action
        table = {
            "NodeActivity.Started": self._activity, "NodeActivity.Stopped": self._activity,
            "Job.Received": self._received, "ReceiptFailure.Recorded": self._received,
            "Delivery.Created": self._begin_delivery, "Delivery.Succeeded": self._delivered,
            "Delivery.AttemptFailed": self._delivered, "Delivery.DeadLettered": self._delivered,
            "Job.BlobPurged": self._purged, "Session.Started": self._login,
            "Session.Ended": self._login, "LoginFailure.Recorded": self._login,
            "access.denied": self._alert, "User.RoleChanged": self._alert,
            "AssociationRefusal.Recorded": self._refused,
            "reidentification.lookup": self._alert,
            "audit.export": self._audit_export, "study.store": self._accessed,
            "audit.access_report_export": self._audit_export, "study.export": self._exported,
            "dimse.move": self._begin_retrieve, "dimse.get": self._begin_retrieve,
            "remote.move": self._begin_retrieve, "remote.get": self._begin_retrieve,
        }
        if a in table:
            return table[a]
        if a in _ACCESSES:
            return self._accessed
        if a in _QUERIES:
            return self._query
        if a.startswith("audit."):
            return self._audit_used
        if a in _USERS or a.startswith(_NETWORK + _SOFTWARE):
            return self._alert
        return None

    # --- the parts every message has ------------------------------------------------------
    def _event(self, event_id: Code, action_code: str, type_code: Code | None = None,
               outcome: str | None = None, description: str = "") -> None:
        outcome = outcome or OUTCOME.get(self.row["outcome"], "4")
        ident = ET.SubElement(self.root, "EventIdentification", {
            "EventActionCode": action_code, "EventDateTime": _time(self.row["occurred_at"]),
            "EventOutcomeIndicator": outcome})
        _code(ident, "EventID", event_id)
        if type_code is not None:
            _code(ident, "EventTypeCode", type_code)
        reason = description or self._reason()
        if reason and outcome != "0":
            ET.SubElement(ident, "EventOutcomeDescription").text = _clean(reason)[:1000]

    def _participant(self, user_id: str, requestor: bool, role: Code | None = None,
                     address: str = "", alternative: str = "") -> None:
        attrs = {"UserID": _clean(user_id) or "unknown",
                 "UserIsRequestor": "true" if requestor else "false"}
        if alternative:
            attrs["AlternativeUserID"] = _clean(alternative)
        if address:
            attrs["NetworkAccessPointID"] = _clean(address)
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
        part = ET.SubElement(self.root, "ActiveParticipant", attrs)
        if role is not None:
            _code(part, "RoleIDCode", role)

    def _router(self, requestor: bool, role: Code | None) -> None:
        self._participant(self.source.ae_title, requestor, role, self.source.host)

    def _actor(self, requestor: bool = True, role: Code | None = None) -> None:
        self._participant(self.row["actor"], requestor, role, self.row.get("source_ip") or "")

    def _audit_source(self) -> None:
        attrs = {"AuditSourceID": _clean(self.source.audit_source_id) or "dicom-router"}
        if self.source.enterprise_site_id:
            attrs["AuditEnterpriseSiteID"] = _clean(self.source.enterprise_site_id)
        src = ET.SubElement(self.root, "AuditSourceIdentification", attrs)
        ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server

    def _object(self, object_id: str, id_type: Code, type_code: str, role: str,
                name: str = "", query: bytes | None = None,
                details: dict[str, str] | None = None,
                sop_class: str = "") -> ET.Element:
        obj = ET.SubElement(self.root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _clean(object_id) or "unknown",
            "ParticipantObjectTypeCode": type_code, "ParticipantObjectTypeCodeRole": role})
        _code(obj, "ParticipantObjectIDTypeCode", id_type)
        if query is not None:
            ET.SubElement(obj, "ParticipantObjectQuery").text = _b64(query)
        else:
            ET.SubElement(obj, "ParticipantObjectName").text = _clean(name or object_id)
        for key, value in (details or {}).items():
            ET.SubElement(obj, "ParticipantObjectDetail", {"type": key,
                                                           "value": _b64(value.encode())})
        if sop_class:
            desc = ET.SubElement(obj, "ParticipantObjectDescription")
            ET.SubElement(desc, "SOPClass", {"UID": _clean(sop_class),
                                             "NumberOfInstances": "1"})
        return obj

    def _study_and_patient(self, sop_class: str = "") -> None:
        study = self.row.get("study_instance_uid")
        if study:
            self._object(study, STUDY_UID, "2", "3", sop_class=sop_class)
        patient = self.row.get("patient_id")
        if patient:
            self._object(patient, PATIENT_NUMBER, "1", "1")

    def _reason(self) -> str:
        for key in ("reason", "error", "detail"):
            value = self.detail.get(key)
            if value:
                return str(value)
        return ""

    # --- one method per kind of event -----------------------------------------------------
    def _activity(self) -> None:
        start = self.action.endswith("Started")
        self._event(APPLICATION_ACTIVITY, "E", APPLICATION_START if start else APPLICATION_STOP)
        self._router(False, APPLICATION)
        self._actor(True, APPLICATION_LAUNCHER)
        self._audit_source()

    def _received(self) -> None:
        failed = self.action == "ReceiptFailure.Recorded"
        self._event(INSTANCES_TRANSFERRED, "C", outcome="4" if failed else "0")
        sender = self.detail.get("calling_aet") or self.row["actor"]
        self._participant(str(sender), True, SOURCE, self.row.get("source_ip") or "")
        self._router(False, DESTINATION)
        self._audit_source()
        self._study_and_patient(str(self.detail.get("sop_class_uid") or ""))

    def _to_destination(self) -> str:
        """The destination's name: in Delivery.Created's detail; later delivery rows carry
        only the delivery id, and the sender adds the name as ``destination``."""
        return str(self.detail.get("destination") or self.row.get("destination")
                   or self.row.get("object_id") or "")

    def _begin_delivery(self) -> None:
        self._event(BEGIN_TRANSFERRING, "E", outcome="0")
        self._router(True, SOURCE)
        self._participant(self._to_destination(), False, DESTINATION)
        self._audit_source()
        self._study_and_patient()

    def _delivered(self) -> None:
        outcome = {"Delivery.AttemptFailed": "4", "Delivery.DeadLettered": "8"}.get(
            self.action, "0")
        destination = self._to_destination()
        kind = self.types.get(destination, "dicom")
        exported = kind != "dicom"
        self._event(EXPORT if exported else INSTANCES_TRANSFERRED, "R", outcome=outcome)
        self._router(True, SOURCE)
        self._participant(destination, False, DESTINATION_MEDIA if exported else DESTINATION,
                          alternative=kind if exported else "")
        self._audit_source()
        self._study_and_patient()

    def _exported(self) -> None:
        """A user downloaded a study, series or instance (ZIP): data leaves the system."""
        self._event(EXPORT, "R")
        self._actor(True, DESTINATION_MEDIA)
        self._router(False, SOURCE)
        self._audit_source()
        if not self.row.get("study_instance_uid") and not self.row.get("patient_id"):
            self._object(self.row.get("object_id") or self.action, URI, "2", "4")
        self._study_and_patient()

    def _purged(self) -> None:
        self._event(STUDY_DELETED, "D")
        self._actor()
        self._router(self.row["actor"] == "system", None)
        self._audit_source()
        self._study_and_patient()

    def _begin_retrieve(self) -> None:
        # dimse.*: a peer asked us to send (we are the source); remote.*: a user asked a
        # remote node to send to us.
        ours = self.action.startswith("dimse.")
        self._event(BEGIN_TRANSFERRING, "E")
        self._actor(True, DESTINATION if ours else None)
        self._router(False, SOURCE if ours else DESTINATION)
        self._audit_source()
        self._study_and_patient()

    def _accessed(self) -> None:
        self._event(INSTANCES_ACCESSED, "C" if self.action == "study.store" else "R")
        self._actor()
        self._router(False, None)
        self._audit_source()
        if not self.row.get("study_instance_uid") and not self.row.get("patient_id"):
            self._object(self.row.get("object_id") or self.action, URI, "2", "4")
        self._study_and_patient()

    def _query(self) -> None:
        self._event(QUERY, "E")
        self._actor(True, SOURCE)
        self._router(False, DESTINATION)
        self._audit_source()
        text = str(self.detail.get("detail") or self.action)
        self._object(STUDY_ROOT_FIND, SOP_CLASS_UID, "2", "24", query=text.encode(),
                     details={"action": self.action})
        self._study_and_patient()

    def _login(self) -> None:
        ended = self.action == "Session.Ended"
        failed = self.action == "LoginFailure.Recorded"
        self._event(USER_AUTHENTICATION, "E", LOGOUT if ended else LOGIN,
                    outcome="4" if failed else "0")
        self._actor()
        self._router(False, None)
        self._audit_source()

    def _alert(self) -> None:
        a = self.action
        if a in ("access.denied", "reidentification.lookup"):
            kind = RESTRICTED_FUNCTION
        elif a == "User.RoleChanged":
            kind = SECURITY_ROLES_CHANGED
        elif a.startswith("User."):
            kind = USER_SECURITY_CHANGED
        elif a.startswith(_NETWORK):
            kind = NETWORK_CONFIGURATION
        else:
            kind = SOFTWARE_CONFIGURATION
        self._event(SECURITY_ALERT, "E", kind,
                    description=str(self.detail.get("detail") or "") if a == "access.denied"
                    else "")
        self._actor()
        self._router(False, None)
        self._audit_source()
        name = str(self.detail.get("name") or self.row.get("object_id") or "")
        object_type = self.row.get("object_type") or "object"
        if a.startswith("User."):
            self._object(name, USER_IDENTIFIER, "1", "11", details={"action": a})
        else:
            self._object(f"{object_type}:{name}", URI, "2", "13", name=name,
                         details={"action": a})
        if a == "reidentification.lookup":  # whose identity was revealed
            self._study_and_patient()

    def _refused(self) -> None:
        count = self.detail.get("count") or 1
        self._event(SECURITY_ALERT, "E", NODE_AUTHENTICATION, outcome="4",
                    description=f"association refused: {self.detail.get('reason') or ''} "
                                f"({count} time{'s' if count != 1 else ''})")
        self._actor(True, SOURCE)
        self._router(False, DESTINATION)
        self._audit_source()

    def _audit_used(self) -> None:
        self._event(AUDIT_LOG_USED, "R")
        self._actor()
        self._router(False, None)
        self._audit_source()
        self._object("audit-trail", URI, "2", "13", name="dicom-router audit trail")
        self._study_and_patient()

    def _audit_export(self) -> None:
        self._event(EXPORT, "R")
        self._actor(True, SOURCE)
        self._router(False, None)
        self._audit_source()
        self._object("audit-trail", URI, "2", "13", name="dicom-router audit trail")
        self._study_and_patient()


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1],
                                "originalText": code[2]})


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat().replace("+00:00", "Z")


def _clean(value: object) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _detail(text: object) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
