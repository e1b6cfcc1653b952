"""The audit trail's hash chain: each audit row gets a link, SHA-256 of the previous link's
hash and the row's canonical content, written in the same transaction as the row
(``audit_chain``, part of the audit view). :func:`verify` recomputes it and names the first
broken link. The canonical form is defined in docs/audit-trail.md and must stay as it is: a
change would break every chain already written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from projections.db import Cursor, ViewDatabase

# study_hashed, patient_hashed: 1 when the row had that value as it was written (it is part
# of the hash), 0 when it was empty then (the view may fill it in later: see canonical()).
CHAIN_SQL = """CREATE TABLE IF NOT EXISTS audit_chain (
    seq BIGINT PRIMARY KEY, application TEXT NOT NULL, position BIGINT NOT NULL,
    hash TEXT NOT NULL, study_hashed INTEGER NOT NULL, patient_hashed INTEGER NOT NULL,
    UNIQUE (application, position))"""
GENESIS = "0" * 64
PAGE = 2000
# The columns of an audit row, in the order the canonical form lists them.
FIELDS = ("application", "position", "occurred_at", "actor", "source_ip", "action",
          "object_type", "object_id", "outcome", "correlation_id", "detail", "job_id",
          "study_instance_uid", "patient_id")


def canonical(row: dict[str, Any], study_hashed: bool, patient_hashed: bool) -> bytes:
    """The row as compact JSON: an array of FIELDS, UTF-8. Study and patient are null unless
    the row had them when it was written: the view fills in those of a row written before
    its job's receipt (or its study's) later, as copies of the receipt's, whose row has
    them hashed."""
    values: list[Any] = [row[f] for f in FIELDS[:12]]
    values[1] = int(values[1])
    values[2] = float(values[2])
    values += [row["study_instance_uid"] if study_hashed else None,
               row["patient_id"] if patient_hashed else None]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def link(previous: str, row: dict[str, Any], study_hashed: bool = True,
         patient_hashed: bool = True) -> str:
    """hex SHA-256 of the previous link's hex hash (ASCII) followed by the canonical row."""
    return hashlib.sha256(previous.encode("ascii")
                          + canonical(row, study_hashed, patient_hashed)).hexdigest()


def hashed(row: dict[str, Any]) -> tuple[bool, bool]:
    """Which of study and patient a row being written has (and so hashes)."""
    return row["study_instance_uid"] is not None, row["patient_id"] is not None


class ChainWriter:
    """Collects the rows of one batch, then links them after the chain's head."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, int], dict[str, Any]] = {}

    def begin(self) -> None:
        self._rows.clear()

    def add(self, row: dict[str, Any]) -> None:
        self._rows[(row["application"], int(row["position"]))] = row

    def end(self, cur: Cursor) -> None:
        if not self._rows:
            return
        cur.execute("SELECT seq, hash FROM audit_chain ORDER BY seq DESC LIMIT 1")
        head = cur.fetchone()
        seq, previous = (int(head["seq"]), head["hash"]) if head else (0, GENESIS)
        links = []
        for (application, position), row in self._rows.items():
            seq += 1
            study, patient = hashed(row)
            previous = link(previous, row, study, patient)
            links.append((seq, application, position, previous, int(study), int(patient)))
        cur.executemany("INSERT INTO audit_chain (seq, application, position, hash,"
                        " study_hashed, patient_hashed) VALUES (?, ?, ?, ?, ?, ?)", links)
        self._rows.clear()


def needs_rebuild(cur: Cursor, existing: Any) -> bool:
    """An audit view built before the chain existed: rebuilt so that every row is linked."""
    return bool(existing(cur, "audit")) and not existing(cur, "audit_chain")


@dataclass(frozen=True)
class Break:
    """The first broken link: which record, when, and what is wrong."""

    seq: int
    application: str
    position: int
    occurred_at: float | None
    problem: str


@dataclass(frozen=True)
class Verdict:
    checked: int
    head: str
    broken: Break | None


_PAGE_SQL = (
    "SELECT c.seq, c.hash, c.application AS c_application, c.position AS c_position,"
    " c.study_hashed, c.patient_hashed,"
    " a.application, a.position, a.occurred_at, a.actor, a.source_ip, a.action,"
    " a.object_type, a.object_id, a.outcome, a.correlation_id, a.detail, a.job_id,"
    " a.study_instance_uid, a.patient_id FROM audit_chain c LEFT JOIN audit a"
    " ON a.application = c.application AND a.position = c.position"
    " WHERE c.seq > ? ORDER BY c.seq LIMIT ?")
_UNLINKED_SQL = (
    "SELECT a.application, a.position, a.occurred_at FROM audit a WHERE NOT EXISTS"
    " (SELECT 1 FROM audit_chain c WHERE c.application = a.application"
    " AND c.position = a.position) AND a.occurred_at >= ? AND a.occurred_at <= ?"
    " ORDER BY a.occurred_at, a.application, a.position LIMIT 1")


def verify(db: ViewDatabase, since: float = float("-inf"),
           until: float = float("inf")) -> Verdict:
    """Check every link whose row is in [since, until] against the previous link's stored
    hash; also rows missing from the chain (added by hand) and links whose row is gone."""
    checked = 0
    head = GENESIS
    last_seq = 0
    for entry in _entries(db):
        seq = int(entry["seq"])
        when = entry["occurred_at"]
        if when is None or since <= float(when) <= until:
            problem = _problem(entry, head, seq, last_seq)
            if problem:
                return Verdict(checked, head, Break(seq, entry["c_application"],
                                                    int(entry["c_position"]),
                                                    None if when is None else float(when),
                                                    problem))
            checked += 1
        head = entry["hash"]
        last_seq = seq
    since_sql = since if since != float("-inf") else -1e308
    until_sql = until if until != float("inf") else 1e308
    unlinked = db.query(_UNLINKED_SQL, (since_sql, until_sql))
    if unlinked:
        row = unlinked[0]
        return Verdict(checked, head, Break(0, row["application"], int(row["position"]),
                                            float(row["occurred_at"]),
                                            "the record is not in the chain (added later)"))
    return Verdict(checked, head, None)


def _entries(db: ViewDatabase) -> Iterator[dict[str, Any]]:
    after = 0
    while True:
        page = db.query(_PAGE_SQL, (after, PAGE))
        yield from page
        if len(page) < PAGE:
            return
        after = int(page[-1]["seq"])


def _problem(entry: dict[str, Any], previous: str, seq: int, last_seq: int) -> str:
    if seq != last_seq + 1:
        return f"the links {last_seq + 1} to {seq - 1} before it were deleted"
    if entry["application"] is None:
        return "the record was deleted"
    if link(previous, entry, bool(entry["study_hashed"]),
            bool(entry["patient_hashed"])) != entry["hash"]:
        return "the record's content does not match its hash (changed since it was written)"
    return ""

