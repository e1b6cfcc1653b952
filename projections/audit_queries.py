"""Reads of the audit view: search with filters and paging, export in time order (keyset
pages, so an export of millions of rows never holds them all), the history of one study, and
the CSV/JSON encodings (CSV cells neutralised against formula injection).

Used by the web pages, the API and ``dicom-router audit export``; no aiohttp here.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from projections.db import ViewDatabase
from projections.sql import like_literal, page, where_clause

Row = dict[str, Any]

# Export columns, in order. ``time`` is occurred_at as ISO 8601 UTC.
COLUMNS = ("time", "actor", "source_ip", "action", "object_type", "object_id", "outcome",
           "study_instance_uid", "patient_id", "job_id", "correlation_id", "detail",
           "application", "position")
OUTCOMES = ("success", "failure", "denied", "not_found")
# The actions the pages offer (grouped, with labels) are in web/pages/audit_actions.py.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MAX_TEXT = 256  # longest filter value accepted (a UID is 64, an ID 64)
_COLUMNS = ("application, position, occurred_at, actor, source_ip, action, object_type,"
            " object_id, outcome, correlation_id, study_instance_uid, patient_id, detail, job_id")
_SELECT = f"SELECT {_COLUMNS} FROM audit"
_ASC = " ORDER BY occurred_at, application, position"
_NEWEST_FIRST = "occurred_at DESC, application DESC, position DESC"


class FilterError(ValueError):
    """Bad filter values; ``fields`` maps each parameter to what is wrong with it."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


def parse_time(value: str, end_of_day: bool = False) -> float:
    """ISO 8601 as Unix seconds; without a zone it is UTC. A bare date is its first instant
    (or, with ``end_of_day``, its last), so ``to=2024-01-15`` covers that whole day."""
    text = value.strip()
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        if end_of_day:
            return (day + timedelta(days=1)).timestamp() - 1e-6
        return day.timestamp()
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(ts: float | None) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds (``2024-01-15T09:30:00.123Z``)."""
    if ts is None:
        return ""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditFilter:
    """What to look for; every field is optional and they combine with AND."""

    user: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> AuditFilter:
        """From query parameters user (or actor), patient, study, action, outcome, from, to."""
        errors: dict[str, str] = {}
        text = {key: _text(query, key, errors)
                for key in ("user", "actor", "patient", "study", "action", "outcome")}
        if text["action"] and not text["action"].replace(",", "").strip():
            errors["action"] = "name an action, a prefix ending in * or several, comma-separated"
        if text["outcome"] and text["outcome"] not in OUTCOMES:
            errors["outcome"] = f"must be one of {', '.join(OUTCOMES)}"
        since = _time(query, "from", errors)
        until = _time(query, "to", errors)
        if since is not None and until is not None and since > until:
            errors["to"] = "must not be before from"
        if errors:
            raise FilterError(errors)
        return cls(user=text["user"] or text["actor"], patient_id=text["patient"],
                   study_uid=text["study"], action=text["action"], outcome=text["outcome"],
                   since=since, until=until)

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.user:
            clauses.append("lower(actor) = lower(?)")
            params.append(self.user)
        for column, value in (("patient_id", self.patient_id),
                              ("study_instance_uid", self.study_uid),
                              ("outcome", self.outcome)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.action:
            clause, values = _actions_clause(self.action)
            clauses.append(clause)
            params.extend(values)
        if self.since is not None:
            clauses.append("occurred_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("occurred_at <= ?")
            params.append(self.until)
        return where_clause(clauses), params

    def up_to(self, moment: float) -> AuditFilter:
        """This filter, ending no later than ``moment`` (an export is a fixed snapshot)."""
        return replace(self, until=moment if self.until is None else min(self.until, moment))

    def describe(self) -> str:
        """The filter for the access record. Patient and study go in their own fields."""
        parts = [f"{key}={value}" for key, value in (
            ("user", self.user), ("action", self.action), ("outcome", self.outcome),
            ("from", iso(self.since) if self.since is not None else None),
            ("to", iso(self.until) if self.until is not None else None)) if value]
        return " ".join(parts)

    def query_params(self) -> dict[str, str]:
        """The filter as query parameters (for paging and export links)."""
        values = {"user": self.user, "patient": self.patient_id, "study": self.study_uid,
                  "action": self.action, "outcome": self.outcome,
                  "from": iso(self.since) if self.since is not None else None,
                  "to": iso(self.until) if self.until is not None else None}
        return {key: value for key, value in values.items() if value}


def _text(query: Mapping[str, str], key: str, errors: dict[str, str]) -> str | None:
    value = (query.get(key) or "").strip()
    if len(value) > MAX_TEXT:
        errors[key] = f"at most {MAX_TEXT} characters"
    return value or None


def _time(query: Mapping[str, str], key: str, errors: dict[str, str]) -> float | None:
    value = (query.get(key) or "").strip()
    if not value:
        return None
    try:
        return parse_time(value, end_of_day=key == "to")
    except ValueError:
        errors[key] = "expected ISO 8601 UTC, e.g. 2024-01-15T09:30:00Z or 2024-01-15"
        return None


def _actions_clause(action: str) -> tuple[str, list[str]]:
    """SQL for ``action``: one action, a prefix (``Delivery.*``) or several of them separated
    by commas (``study.view,viewer.open,dicomweb.*``: any of them)."""
    exact = [a for a in (p.strip() for p in action.split(",")) if a and not a.endswith("*")]
    prefixes = [a[:-1] for a in (p.strip() for p in action.split(",")) if a.endswith("*")]
    parts = ["action LIKE ? ESCAPE '!'"] * len(prefixes)
    if len(exact) == 1:
        parts.append("action = ?")
    elif exact:
        parts.append(f"action IN ({', '.join('?' * len(exact))})")
    clause = parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
    return clause, [*(like_literal(p) + "%" for p in prefixes), *exact]


def search(db: ViewDatabase, flt: AuditFilter, limit: int, offset: int) -> tuple[list[Row], int]:
    """One page of matching rows, newest first, and how many match in all."""
    return page(db, _COLUMNS, "audit", flt.where(), _NEWEST_FIRST, limit, offset)


def export_pages(db: ViewDatabase, flt: AuditFilter, page_size: int = 1000) -> Iterator[list[Row]]:
    """Matching rows oldest first, a page at a time (keyset: no OFFSET, no snapshot held)."""
    after: tuple[Any, ...] | None = None
    while True:
        rows = export_page(db, flt, after, page_size)
        if not rows:
            return
        yield rows
        if len(rows) < page_size:
            return
        last = rows[-1]
        after = (last["occurred_at"], last["application"], last["position"])


def export_page(db: ViewDatabase, flt: AuditFilter, after: Sequence[Any] | None,
                page_size: int) -> list[Row]:
    """The page of matching rows that follows ``after`` = (occurred_at, application, position)."""
    where, params = flt.where()
    if after is not None:
        where += (" AND " if where else " WHERE ") + \
            "(occurred_at, application, position) > (?, ?, ?)"
        params = [*params, *after]
    rows: list[Row] = db.query(_SELECT + where + _ASC + " LIMIT ?", [*params, page_size])
    return rows


def study_history(db: ViewDatabase, study_uid: str, limit: int, offset: int
                  ) -> tuple[list[Row], int, list[Row]]:
    """Every row of one study in time order (one page), the total, and counts per action."""
    where = " WHERE study_instance_uid = ?"
    summary = db.query("SELECT action, outcome, count(*) AS n FROM audit" + where
                       + " GROUP BY action, outcome ORDER BY action, outcome", [study_uid])
    total = sum(int(r["n"]) for r in summary)
    rows = db.query(_SELECT + where + _ASC + " LIMIT ? OFFSET ?", [study_uid, limit, offset])
    return rows, total, summary


def patient_of(rows: Sequence[Row]) -> str | None:
    """The patient ID the rows of a study name (the first one given)."""
    return next((r["patient_id"] for r in rows if r.get("patient_id")), None)


# --- encodings ------------------------------------------------------------------------------

def public_row(row: Row) -> Row:
    """A row as the API and exports show it: ISO time, detail as an object."""
    out = {key: row.get(key) for key in COLUMNS if key not in ("time", "detail")}
    out["time"] = iso(row["occurred_at"])
    out["position"] = int(row["position"])
    try:
        out["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
    except ValueError:
        out["detail"] = {"text": row["detail"]}
    return {key: out[key] for key in COLUMNS}


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet will not run: text starting with = + - @ TAB or CR gets a '."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


def csv_text(rows: Sequence[Row], header: bool = False) -> str:
    """RFC 4180 lines (CRLF, quoted where needed) of ``rows``, with the header if asked."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    if header:
        writer.writerow(COLUMNS)
    for row in rows:
        public = public_row(row)
        public["detail"] = row.get("detail") or ""
        writer.writerow([csv_cell(public[key]) for key in COLUMNS])
    return buffer.getvalue()


def json_items(rows: Sequence[Row], first: bool) -> str:
    """Rows as the items of a JSON array (comma-led unless they are the first)."""
    parts = [json.dumps(public_row(row), ensure_ascii=False, sort_keys=False)
             for row in rows]
    if not parts:
        return ""
    return ("" if first else ",\n") + ",\n".join(parts)


# --- the ATNA sender's reads (router/atna/sender.py) -----------------------------------------
ROWS_AFTER_SQL = ("SELECT * FROM audit WHERE application = ? AND position > ?"
                  " ORDER BY position LIMIT ?")
DESTINATION_CONFIGS_SQL = ("SELECT object_id, detail FROM audit WHERE action IN"
                           " ('Destination.Created', 'Destination.Updated')"
                           " ORDER BY occurred_at")


def rows_after(db: ViewDatabase, application: str, position: int, limit: int) -> list[Row]:
    """Up to ``limit`` rows of log ``application`` after ``position``, in log order."""
    return db.query(ROWS_AFTER_SQL, (application, position, limit))


def destination_configs(db: ViewDatabase) -> list[Row]:
    """Every Destination.Created/Updated row (object_id, detail), oldest first."""
    return db.query(DESTINATION_CONFIGS_SQL)


def deliveries_created(db: ViewDatabase, delivery_ids: Sequence[str]) -> list[Row]:
    """The Delivery.Created rows (object_id, detail) of ``delivery_ids``."""
    marks = ", ".join("?" for _ in delivery_ids)
    return db.query(f"SELECT object_id, detail FROM audit WHERE action = 'Delivery.Created'"
                    f" AND object_id IN ({marks})", delivery_ids)
