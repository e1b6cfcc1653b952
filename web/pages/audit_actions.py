"""The audit trail's actions in plain language, grouped as the action picker offers them
(access to patient data, configuration, logins, deliveries, receipts). Each choice's value is
an ``action`` filter: one action, a prefix ending in ``*``, or several, comma-separated.
"""

from __future__ import annotations

from collections.abc import Sequence

Choice = tuple[str, str]  # (filter value, label)

PATIENT_DATA = ("study.*,instance.view,viewer.open,dicomweb.*,wado.*,dimse.*,studies.*,"
                "job.view,jobs.*,transfer*,remote.*,transform.preview,reidentification.lookup")
GROUPS: tuple[tuple[str, tuple[Choice, ...]], ...] = (
    ("Access to patient data", (
        (PATIENT_DATA, "All access to patient data"),
        ("study.view", "Study page viewed"),
        ("viewer.open", "Study opened in the viewer"),
        ("instance.view", "Instance page (tags) viewed"),
        ("study.export", "Downloaded as a ZIP (study, series or instance)"),
        ("dicomweb.*", "Any DICOMweb read (search, retrieval, viewer images)"),
        ("dicomweb.retrieve,wado.retrieve", "Objects retrieved (WADO-RS, WADO-URI)"),
        ("dicomweb.metadata", "Metadata read (WADO-RS)"),
        ("dicomweb.frames", "Image frames read (viewer, WADO-RS)"),
        ("dicomweb.rendered,dicomweb.thumbnail", "Rendered images and thumbnails"),
        ("dicomweb.search", "Searched over DICOMweb (QIDO-RS)"),
        ("studies.*", "Study list searched"),
        ("study.store", "Uploaded over DICOMweb (STOW-RS)"),
        ("job.view,jobs.*", "Job pages viewed"),
        ("dimse.*", "Queried or retrieved by a DICOM node (C-FIND, C-MOVE, C-GET)"),
        ("remote.*", "Remote PACS queried or retrieved"),
        ("transform.preview", "Transforms dry run on a stored instance"),
        ("reidentification.lookup", "Pseudonym re-identified"),
        ("audit.*", "Audit trail read, exported or verified"),
    )),
    ("Configuration", (
        ("Rule.*,Destination.*,User.*,RemoteNode.*,RuntimeSettings.*,Transform.*",
         "All configuration changes"),
        ("Rule.*", "Rules created, changed or deleted"),
        ("Rule.Updated", "Rule changed"),
        ("Destination.*", "Destinations created, changed, paused or deleted"),
        ("Destination.Updated", "Destination changed"),
        ("User.*", "User accounts created or changed"),
        ("User.RoleChanged", "User role changed"),
        ("User.ApiTokenCreated,User.ApiTokenRevoked", "API tokens made or revoked"),
        ("RemoteNode.*", "Remote PACS nodes created, changed or deleted"),
        ("RuntimeSettings.Changed", "Setting changed while running"),
        ("Rule.Detached,Destination.Detached,RemoteNode.Detached",
         "Detached from the configuration file"),
        ("Transform.*", "Transforms created, changed or deleted"),
    )),
    ("Logins", (
        ("Session.*,LoginFailure.Recorded,access.denied,User.Unlocked",
         "All logins, logouts, refusals and unlocks"),
        ("Session.Started", "Logged in"),
        ("Session.Ended", "Logged out or session ended"),
        ("LoginFailure.Recorded", "Login refused"),
        ("access.denied", "Page or API call refused (no permission)"),
        ("User.Unlocked", "User unlocked after failed logins"),
        ("AssociationRefusal.Recorded", "DICOM association refused"),
        ("NodeActivity.*", "Router node started or stopped"),
    )),
    ("Deliveries", (
        ("Delivery.*", "All delivery events"),
        ("Delivery.Succeeded", "Delivered"),
        ("Delivery.AttemptFailed", "Attempt failed, will retry"),
        ("Delivery.DeadLettered", "Given up (dead letter)"),
        ("Delivery.Requeued,Delivery.Cancelled", "Requeued or cancelled by a user"),
        ("BulkAction.Requested", "Bulk requeue, cancel or send by a user"),
        ("Unit.*", "Series or study released to a destination"),
        ("AIRequest.*", "AI processor round trips"),
        ("Pseudonym.Recorded", "Pseudonym given by a de-identifying transform"),
    )),
    ("Receipts and routing", (
        ("Job.*,ReceiptFailure.Recorded,Instance.*", "All receipts and routing decisions"),
        ("Job.Received", "Object received"),
        ("Job.Routed,Job.Rerouted", "Routing decision"),
        ("ReceiptFailure.Recorded", "Object refused"),
        ("Job.DuplicateIgnored,Job.ConflictKept", "Duplicate or conflicting object"),
        ("Job.BlobPurged", "Stored object purged (retention)"),
        ("Retrieve.*", "Retrieves from a remote PACS"),
        ("Commitment.*,dimse.commitment", "Storage commitment requests and reports"),
        ("Commitment.ReportFailed,Commitment.Abandoned", "Storage commitment report failed"),
    )),
)

# Plain-language names of single actions, for the rows of the trail.
LABELS: dict[str, str] = {
    **{value: label for _, choices in GROUPS for value, label in choices
       if "," not in value and not value.endswith("*")},
    "Rule.Created": "Rule created", "Rule.Deleted": "Rule deleted",
    "Destination.Created": "Destination created", "Destination.Deleted": "Destination deleted",
    "Destination.Paused": "Destination paused", "Destination.Resumed": "Destination resumed",
    "User.Created": "User account created", "User.PasswordChanged": "Password changed",
    "User.Disabled": "User account disabled", "User.Enabled": "User account enabled",
    "User.ApiTokenCreated": "API token made", "User.ApiTokenRevoked": "API token revoked",
    "RemoteNode.Created": "Remote PACS node created", "RemoteNode.Updated":
        "Remote PACS node changed", "RemoteNode.Deleted": "Remote PACS node deleted",
    "Delivery.Created": "Delivery started", "Delivery.Requeued": "Delivery requeued",
    "Delivery.Cancelled": "Delivery cancelled", "Job.Routed": "Routing decision",
    "Job.Rerouted": "Routed again", "Job.DuplicateIgnored": "Duplicate ignored",
    "Job.ConflictKept": "Conflicting object kept, not routed",
    "Instance.Registered": "New instance registered", "Instance.VersionAdded":
        "New version of an instance", "Unit.Dispatched": "Series or study released",
    "Unit.Amended": "Late instances released", "dicomweb.retrieve": "Objects retrieved (WADO-RS)",
    "wado.retrieve": "Object retrieved (WADO-URI)", "dicomweb.rendered": "Rendered image read",
    "dicomweb.thumbnail": "Thumbnail read", "dicomweb.bulkdata": "Bulk data read",
    "jobs.list": "Job list searched", "job.view": "Job page viewed",
    "studies.search": "Study list searched", "dimse.find": "Queried by a DICOM node (C-FIND)",
    "dimse.move": "Retrieved by a DICOM node (C-MOVE)",
    "dimse.get": "Retrieved by a DICOM node (C-GET)", "remote.find": "Remote PACS queried",
    "remote.move": "Retrieve from a remote PACS (C-MOVE)",
    "remote.get": "Retrieve from a remote PACS (C-GET)",
    "audit.search": "Audit trail searched", "audit.export": "Audit trail exported",
    "audit.history": "Study history read", "audit.state": "Configuration as of a time read",
    "audit.versions": "Configuration versions compared",
    "audit.access_report": "Patient access report read",
    "audit.access_report_export": "Patient access report exported",
    "audit.patient_search": "Patients searched for an access report",
    "Retrieve.Requested": "Retrieve requested", "Retrieve.Progressed": "Retrieve progressed",
    "Retrieve.Completed": "Retrieve completed", "Retrieve.Failed": "Retrieve failed",
    "RuntimeSettings.Created": "Run-time settings started",
    "ai.callback": "AI processor called back",
    "Commitment.Requested": "Storage commitment requested",
    "Commitment.Reported": "Storage commitment reported",
    "Commitment.ReportFailed": "Storage commitment report failed, will retry",
    "Commitment.Abandoned": "Storage commitment report given up",
    "dimse.commitment": "Storage commitment request refused",
    "Rule.Detached": "Rule detached from the configuration file",
    "Destination.Detached": "Destination detached from the configuration file",
    "RemoteNode.Detached": "Remote PACS node detached from the configuration file",
    "Transform.Created": "Transform created", "Transform.Updated": "Transform changed",
    "Transform.Deleted": "Transform deleted",
    "NodeActivity.Started": "Router node started", "NodeActivity.Stopped": "Router node stopped",
    "audit.verify": "Audit trail's hash chain verified",
    "transfers.list": "Transfer list searched", "transfer.view": "Transfer viewed",
}


def label_of(action: str) -> str:
    """The plain-language name of an action (the action itself when there is none)."""
    return LABELS.get(action, action)


def choices_with(current: str | None) -> Sequence[tuple[str, tuple[Choice, ...]]]:
    """The picker's groups; a filter given in the URL that is not among them is kept as
    one more choice, so that the page shows what it searched for."""
    known = {value for _, choices in GROUPS for value, _ in choices}
    if not current or current in known:
        return GROUPS
    return (*GROUPS, ("Other", ((current, current),)))
