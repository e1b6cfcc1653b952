"""Routing a study on by an AI processor's result tags: the rules are evaluated again for each
job the processor saw, with ``ai.<destination>.<key>`` values beside the header, and any
destination not already chosen is added by ``Job.Rerouted`` (series/study grouping applies).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from pydicom.dataset import Dataset

from router.application.admin_state import AdminState
from router.application.unit_plan import plan_units
from router.dicom.header import HeaderError, read_header
from router.domain.ingest import Job
from router.domain.rules import RoutingInput, evaluate
from router.storage.blobs import BlobError, BlobStore

logger = logging.getLogger(__name__)

SAVE_BATCH = 50


def routing_tags(destination: str, tags: Mapping[str, Any]) -> dict[str, object]:
    """Result tags as the rules address them: ``ai.<destination>.<key>``."""
    return {f"ai.{destination}.{key}": value for key, value in tags.items()}


def _header(job: Any, blobs: BlobStore) -> Dataset:
    """The job's stored header, or (when retention purged the object) its index attributes."""
    try:
        path = blobs.fetch(job.sha256)
    except BlobError:
        path = None
    if path is not None:
        try:
            return read_header(path, check=False)
        except HeaderError:
            pass
    ds = Dataset()
    for keyword, value in (job.index or {}).items():
        try:
            setattr(ds, keyword, value)
        except (TypeError, ValueError, KeyError):
            continue
    return ds


def reroute(app: Any, admin: AdminState, blobs: BlobStore, job_ids: list[str],
            extra: Mapping[str, object], ctx: dict[str, str]) -> int:
    """Add the destinations the rules now choose; returns how many jobs were rerouted."""
    snapshot = admin.snapshot()
    pending: list[Job] = []
    rerouted = 0
    for job_id in job_ids:
        try:
            job: Any = app.repository.get(UUID(job_id))
        except AggregateNotFoundError:
            continue
        if not isinstance(job, Job) or job.duplicate_of:
            continue
        header = _header(job, blobs)
        decision = evaluate(snapshot.rules, RoutingInput(
            calling_aet=job.calling_aet, called_aet=job.called_aet, source_ip=job.source_ip,
            dataset=header, extra=extra))
        new = [d for d in decision.destinations if d not in job.destinations]
        if not new:
            continue
        job.reroute(plan_units(snapshot, decision, new, header) or None, **ctx,
                    matched_rules=[{"rule_id": m.rule_id, "version": m.version, "name": m.name}
                                   for m in decision.matched],
                    destinations=new, reason="")
        pending.append(job)
        if len(pending) >= SAVE_BATCH:
            app.save(*pending)
            rerouted += len(pending)
            pending = []
    if pending:
        app.save(*pending)
        rerouted += len(pending)
    if rerouted:
        logger.info("AI result tags routed %d job(s) on", rerouted)
    return rerouted
