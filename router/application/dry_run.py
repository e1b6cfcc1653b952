"""Dry runs of the routing rules: which rules would match one instance (an uploaded file or the
stored object of a past job), why each criterion held or failed, and where it would go.

Nothing is recorded and nothing is sent; the domain's ``evaluate`` decides and ``explain``
gives the per-criterion rows, so a dry run answers exactly what the receive path would.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from projections import jobs_queries
from projections.db import Queryable
from router.dicom.header import HeaderError, read_header
from router.domain.rules import (
    ConditionResult,
    RoutingInput,
    RuleSpec,
    VersionedRule,
    evaluate,
    explain,
)
from router.storage.blobs import BlobError, BlobStore


class DryRunError(ValueError):
    """The input cannot be dry-run (not DICOM, unknown job, object gone); no PHI in it."""


class JobNotFound(DryRunError):
    """No job with that id in the jobs view."""


@dataclass(frozen=True)
class RuleOutcome:
    """One rule against one instance: matched or not, applied or not, and why."""

    name: str
    priority: int
    enabled: bool
    matched: bool
    applied: bool  # matched, enabled and reached (no earlier rule stopped evaluation)
    note: str
    stop: bool
    destinations: tuple[str, ...]
    conditions: tuple[ConditionResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "priority": self.priority, "enabled": self.enabled,
            "matched": self.matched, "applied": self.applied, "note": self.note,
            "stop": self.stop, "destinations": list(self.destinations),
            "conditions": [{"label": c.label, "matched": c.matched, "actual": c.actual}
                           for c in self.conditions],
        }


@dataclass(frozen=True)
class DryRun:
    """Every rule in evaluation order, and the routing decision the receive path would take."""

    rules: tuple[RuleOutcome, ...]
    destinations: tuple[str, ...]
    stopped_by: str | None
    default_destination_used: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [r.to_dict() for r in self.rules],
            "destinations": list(self.destinations),
            "stopped_by": self.stopped_by,
            "default_destination_used": self.default_destination_used,
            "unrouted": not self.destinations,
        }


def dry_run(rules: Sequence[VersionedRule], item: RoutingInput,
            default_destination: str | None = None) -> DryRun:
    """Evaluate ``rules`` on ``item`` as the receiver does, explaining every rule."""
    decision = evaluate(rules, item)
    applied = {m.rule_id for m in decision.matched}
    stopper = next((r.spec.name for r in rules if r.rule_id == decision.stopped_by), None)
    ordered = sorted(rules, key=lambda r: (r.spec.priority, r.spec.name, r.rule_id))
    outcomes = []
    for rule in ordered:
        conditions = explain(rule.spec, item)
        matched = all(c.matched for c in conditions)
        outcomes.append(RuleOutcome(
            name=rule.spec.name, priority=rule.spec.priority, enabled=rule.spec.enabled,
            matched=matched, applied=rule.rule_id in applied,
            note=_note(rule.spec, matched, rule.rule_id in applied, stopper),
            stop=rule.spec.stop, destinations=rule.spec.destinations, conditions=conditions))
    destinations = decision.destinations
    if not destinations and default_destination:
        return DryRun(tuple(outcomes), (default_destination,), stopper, True)
    return DryRun(tuple(outcomes), destinations, stopper, False)


def _note(spec: RuleSpec, matched: bool, applied: bool, stopper: str | None) -> str:
    if applied:
        return "matched; stops evaluation" if spec.stop else "matched"
    if not matched:
        return "did not match"
    if not spec.enabled:
        return "would match, but the rule is disabled"
    return f"would match, but {stopper!r} stopped evaluation before it"


def with_candidate(rules: Sequence[VersionedRule], spec: RuleSpec) -> list[VersionedRule]:
    """The stored rules with ``spec`` in place of the rule of the same name (or added)."""
    kept = [r for r in rules if r.spec.name != spec.name]
    previous = next((r for r in rules if r.spec.name == spec.name), None)
    rule_id = previous.rule_id if previous else "candidate"
    return [*kept, VersionedRule(rule_id, previous.version + 1 if previous else 0, spec)]


# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInput:
    """A past job as the rules see it, and the identifiers its access record needs (PHI)."""

    item: RoutingInput
    job_id: str
    received_at: float
    study_instance_uid: str | None
    patient_id: str | None
    routing: str
    destinations: tuple[str, ...]


def header_of_upload(stream: BinaryIO, spool_dir: Path | None = None) -> Dataset:
    """The header (no pixel data) of an uploaded file; DryRunError if it is not DICOM."""
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="dry-run-", suffix=".dcm") as tmp:
        shutil.copyfileobj(stream, tmp, 1 << 20)
        tmp.flush()
        try:
            return read_header(Path(tmp.name), check=False)
        except HeaderError as exc:
            raise DryRunError(f"the uploaded file is not usable DICOM: {exc}") from None


def upload_input(header: Dataset, calling_aet: str, called_aet: str,
                 source_ip: str) -> RoutingInput:
    """An uploaded file as if ``calling_aet`` had sent it from ``source_ip`` to ``called_aet``."""
    return RoutingInput(calling_aet=calling_aet.strip(), called_aet=called_aet.strip(),
                        source_ip=source_ip.strip(), dataset=header)


def job_input(jobs_db: Queryable, blobs: BlobStore, job_id: str) -> JobInput:
    """A past job's stored object (header only) with the AE titles and IP it arrived with."""
    row = jobs_queries.dry_run_job(jobs_db, job_id.strip())
    if row is None:
        raise JobNotFound(f"job {job_id.strip()[:64]!r} does not exist")
    try:
        path = blobs.wait_for(row["sha256"], timeout=2.0)
    except BlobError as exc:
        raise DryRunError(f"the job's stored object cannot be read: {exc}") from None
    if path is None:
        raise DryRunError("the job's stored object is no longer in the blob store")
    try:
        header = read_header(path, check=False)
    except HeaderError as exc:
        raise DryRunError(f"the job's stored object is unreadable: {exc}") from None
    item = RoutingInput(calling_aet=row["calling_aet"], called_aet=row["called_aet"],
                        source_ip=row["source_ip"], dataset=header)
    return JobInput(item=item, job_id=row["job_id"], received_at=float(row["received_at"]),
                    study_instance_uid=row["study_instance_uid"],
                    patient_id=row["patient_id"], routing=row["routing"],
                    destinations=_names(row["destinations"]))


def _names(stored: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(stored or "[]")
    except ValueError:
        return ()
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def recent_jobs(jobs_db: Queryable, limit: int = 20) -> list[dict[str, Any]]:
    """The latest jobs (no patient identifiers), to pick one for a dry run."""
    return jobs_queries.recent_jobs(jobs_db, limit)
