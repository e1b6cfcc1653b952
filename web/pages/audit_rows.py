"""How rows of the audit trail are shown: the action in plain language, the detail decoded
(times instead of Unix seconds, key/value pairs instead of JSON) and, for changes of a rule,
destination, user or remote node, what the change changed (from the admin log).
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from projections.audit_queries import iso
from router.application.versions import FieldChange, changes_at
from web.pages.audit_actions import label_of

Row = dict[str, Any]

TIME_KEYS = frozenset({"expires_at", "retry_at", "deadline"})  # Unix seconds
KEY_LABELS = {"expires_at": "expires", "retry_at": "retry at", "detail": "",
              "duration_ms": "duration (ms)", "matched_rules": "matched rules",
              "sop_class_uid": "SOP class", "transfer_syntax_uid": "transfer syntax",
              "calling_aet": "calling AE", "called_aet": "called AE", "node_ae": "node AE",
              "stopped_by": "stopped by", "default_destination_used": "default destination",
              "original_job_id": "original job", "token_id": "token"}
# Admin events that change an object's fields: their rows show the change.
CHANGES = frozenset({"Rule.Updated", "Destination.Updated", "RemoteNode.Updated",
                     "User.RoleChanged", "User.Disabled", "User.Enabled",
                     "User.ApiTokenCreated", "User.ApiTokenRevoked", "Rule.Deleted",
                     "Destination.Deleted", "Destination.Paused", "Destination.Resumed",
                     "RemoteNode.Deleted"})
VERSIONED = ("Rule.", "Destination.", "User.", "RemoteNode.")


def detail_of(row: Row) -> dict[str, Any]:
    try:
        detail = json.loads(row.get("detail") or "{}")
    except ValueError:
        return {"detail": str(row.get("detail") or "")}
    return detail if isinstance(detail, dict) else {"detail": str(detail)}


def decoded(row: Row) -> list[dict[str, str]]:
    """The detail as ``{"key", "text", "time"}`` items (``time`` an ISO instant for the
    reader's time zone, else empty); empty values left out."""
    items = []
    for key, value in detail_of(row).items():
        if value in (None, "", [], {}, False) or key == "name":
            continue
        label = KEY_LABELS.get(key, key.replace("_", " "))
        if key in TIME_KEYS and isinstance(value, int | float):
            items.append({"key": label, "text": "", "time": iso(float(value))})
        else:
            items.append({"key": label, "text": _text(key, value), "time": ""})
    return items


def _text(key: str, value: Any) -> str:
    if value is True:
        return "yes"
    if key == "matched_rules" and isinstance(value, list):
        return ", ".join(f"{r.get('name', r.get('rule_id', ''))} (version {r.get('version')})"
                         if isinstance(r, dict) else str(r) for r in value)
    if isinstance(value, list):
        return ", ".join(_text(key, v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_text(k, v)}" for k, v in value.items())
    return str(value)


def object_label(row: Row) -> str:
    """The rule, destination or user name when the detail gives one, else the object id."""
    name = detail_of(row).get("name")
    return str(name) if name else str(row.get("object_id") or "")


def versions_link(row: Row) -> str:
    """The "compare with the previous version" link of a configuration row, else ""."""
    version = detail_of(row).get("version")
    if row.get("application") != "admin" or not str(row["action"]).startswith(VERSIONED) \
            or not isinstance(version, int):
        return ""
    if version == 1:  # a creation: its history, the latest version beside the one before
        return f"/audit/versions?object={row['object_id']}"
    return f"/audit/versions?object={row['object_id']}&a={version - 1}&b={version}"


def changes(admin_app: Any, rows: list[Row]) -> dict[tuple[str, int], list[FieldChange]]:
    """What each configuration change among ``rows`` changed, by (application, position)."""
    found: dict[tuple[str, int], list[FieldChange]] = {}
    for row in rows:
        version = detail_of(row).get("version")
        if row.get("application") != "admin" or row["action"] not in CHANGES \
                or not isinstance(version, int):
            continue
        try:
            oid = UUID(str(row["object_id"]))
        except ValueError:
            continue
        found[(row["application"], int(row["position"]))] = changes_at(admin_app, oid, version)
    return found


def present(rows: list[Row], changed: dict[tuple[str, int], list[FieldChange]] | None = None
            ) -> list[Row]:
    changed = changed or {}
    return [{**row, "time": iso(row["occurred_at"]), "label": label_of(str(row["action"])),
             "detail_items": decoded(row), "object_label": object_label(row),
             "changes": changed.get((row["application"], int(row["position"])), []),
             "versions": versions_link(row)} for row in rows]
