"""Storage Commitment (PS3.4 Annex J, push model): reading an N-ACTION request, recording it,
deciding which referenced instances are committed, and recording the report.

"Committed" means, by ``[dicom] commitment_destination``: received (the receipt is in the log,
its object in the blob store, with the SOP class the requester names), or delivered to that
destination. Decisions read the jobs view, after waiting for it to hold every receipt and
delivery outcome recorded before (read-your-writes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from pydicom.dataset import Dataset

from projections.db import ViewDatabase
from projections.jobs_queries import delivery_statuses, jobs_of_instance
from router.application.commands import Actor
from router.application.stores import EventStores
from router.dicom.uids import uid_problem
from router.domain.commitment import Commitment, commitment_id
from router.storage.blobs import BlobStore

ACTION_COMMIT = 1  # PS3.4 J.3.2: Action Type ID "Request Storage Commitment"
EVENT_ALL_COMMITTED, EVENT_SOME_FAILED = 1, 2  # J.3.3: Event Type IDs of the report
MAX_REFERENCES = 10000
# Failure reasons (PS3.4 J.3.3.1.1, Failure Reason (0008,1197))
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT = 0x0112
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Referenced SOP Class not supported
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION = 0x0131  # Duplicate transaction UID
# N-ACTION statuses (PS3.7 Annex C)
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT = 0x0115  # of the Action Information
RESOURCE_LIMITATION = 0x0213
NOT_AUTHORISED = 0x0124


class CommitmentRefused(Exception):
    """An N-ACTION we do not accept: its status and a reason naming the attribute."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DuplicateTransaction(CommitmentRefused):
    """A request whose Transaction UID this AE used before: answered by a report failing each
    of its instances with 0x0131 (PS3.4 J.3.3.1.1), not by a refused N-ACTION."""

    def __init__(self, request: CommitmentRequest) -> None:
        super().__init__(DUPLICATE_TRANSACTION, "Transaction UID (0008,1195) is already in use"
                         " by an earlier request of this AE")
        self.request = request


@dataclass(frozen=True)
class CommitmentRequest:
    """What an N-ACTION asks: commit these [SOP class, SOP instance] pairs."""

    transaction_uid: str
    references: list[list[str]]


def parse_request(action_type: int | None, info: Dataset | None) -> CommitmentRequest:
    """The request in an N-ACTION, or CommitmentRefused saying what is wrong with it."""
    if action_type != ACTION_COMMIT:
        raise CommitmentRefused(NO_SUCH_ACTION, f"Action Type ID {action_type} is not 1"
                                " (Request Storage Commitment)")
    if info is None:
        raise CommitmentRefused(INVALID_ARGUMENT, "the N-ACTION has no Action Information")
    transaction_uid = str(info.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise CommitmentRefused(INVALID_ARGUMENT, "Transaction UID (0008,1195) is missing")
    problem = uid_problem(transaction_uid)
    if problem:
        raise CommitmentRefused(INVALID_ARGUMENT, f"Transaction UID (0008,1195) {problem}")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise CommitmentRefused(INVALID_ARGUMENT,
                                "Referenced SOP Sequence (0008,1199) is missing or empty")
    if len(items) > MAX_REFERENCES:
        raise CommitmentRefused(RESOURCE_LIMITATION, f"Referenced SOP Sequence (0008,1199) has"
                                f" {len(items)} items (at most {MAX_REFERENCES})")
    references = []
    for number, item in enumerate(items, start=1):
        pair = [str(item.get("ReferencedSOPClassUID", "") or "").strip(),
                str(item.get("ReferencedSOPInstanceUID", "") or "").strip()]
        for value, name in zip(pair, ("Referenced SOP Class UID (0008,1150)",
                                      "Referenced SOP Instance UID (0008,1155)"), strict=True):
            problem = uid_problem(value)
            if problem:
                raise CommitmentRefused(INVALID_ARGUMENT, f"{name} of item {number} of"
                                        f" Referenced SOP Sequence (0008,1199) {problem}")
        references.append(pair)
    return CommitmentRequest(transaction_uid, references)


@dataclass(frozen=True)
class Verdict:
    """Which references are committed and which failed (with a reason); ``settled`` once
    nothing more can change (always, when committed means received)."""

    committed: list[list[str]]
    failed: list[list[Any]]  # [SOP class, SOP instance, failure reason]
    settled: bool

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED

    @classmethod
    def duplicate(cls, request: CommitmentRequest) -> Verdict:
        """Every instance of a request with a reused Transaction UID failed (0x0131)."""
        return cls([], [[c, i, DUPLICATE_TRANSACTION] for c, i in request.references], True)


class CommitmentChecker:
    """Decides which referenced instances are committed, from the jobs view and blob store."""

    def __init__(self, jobs: Callable[[], ViewDatabase], blobs: BlobStore,
                 settle: Callable[[], Any] = lambda: True,
                 storage_classes: Collection[str] = ()) -> None:
        self._jobs = jobs
        self._blobs = blobs
        self._settle = settle  # waits for the jobs view to catch up with the logs
        # The SOP classes the router stores: an instance never received of another class is
        # "SOP class not supported" rather than "no such object" (none: not told apart).
        self._classes = frozenset(storage_classes)

    def check(self, references: Sequence[Sequence[str]], destination: str,
              final: bool) -> Verdict:
        """The verdict now; ``final``: what is still undecided counts as failed (0x0110)."""
        self._settle()
        committed: list[list[str]] = []
        failed: list[list[Any]] = []
        settled = True
        for sop_class, sop_instance in references:
            reason = self._failure(sop_class, sop_instance, destination)
            if reason == 0:
                committed.append([sop_class, sop_instance])
            elif reason is None and not final:
                settled = False
            else:
                failed.append([sop_class, sop_instance, reason or PROCESSING_FAILURE])
        return Verdict(committed, failed, settled)

    def _failure(self, sop_class: str, sop_instance: str, destination: str) -> int | None:
        """0 when committed, a failure reason, or None while a delivery is still open."""
        rows = jobs_of_instance(self._jobs(), sop_instance)
        if not rows:
            if self._classes and sop_class not in self._classes:
                return SOP_CLASS_NOT_SUPPORTED
            return NO_SUCH_OBJECT
        ours = [r for r in rows if r["sop_class_uid"] == sop_class]
        if not ours:
            return CLASS_INSTANCE_CONFLICT
        if not destination:
            stored = any(self._blobs.exists(str(r["sha256"])) for r in ours)
            return 0 if stored else PROCESSING_FAILURE
        statuses = delivery_statuses(self._jobs(), destination,
                                     [str(r["job_id"]) for r in ours])
        if "delivered" in statuses:
            return 0
        if statuses and statuses <= {"dead", "cancelled"}:
            return PROCESSING_FAILURE
        return None


class Commitments:
    """Records commitment requests and their reports in the delivery log."""

    def __init__(self, stores: EventStores, destination: str, timeout: float,
                 node: str) -> None:
        self._app = stores.delivery
        self.destination = destination
        self.timeout = timeout
        self._node = node

    def record_request(self, actor: Actor, calling_aet: str, called_aet: str,
                       request: CommitmentRequest) -> Commitment:
        """Record a request; DuplicateTransaction when its Transaction UID was used before."""
        if self.load(commitment_id(calling_aet, request.transaction_uid)) is not None:
            raise DuplicateTransaction(request)
        commitment = Commitment(
            request.transaction_uid, calling_aet, **actor.ctx(), called_aet=called_aet,
            references=request.references, destination=self.destination,
            deadline=time.time() + self.timeout, node=self._node)
        self._app.save(commitment)
        return commitment

    def load(self, commitment: uuid.UUID | str) -> Commitment | None:
        try:
            found: object = self._app.repository.get(uuid.UUID(str(commitment)))
        except AggregateNotFoundError:
            return None
        return found if isinstance(found, Commitment) else None

    def reported(self, commitment: Commitment, verdict: Verdict, via: str) -> None:
        commitment.report(**Actor("system").ctx(), event_type=verdict.event_type,
                          committed=len(verdict.committed), failed=len(verdict.failed),
                          committed_instances=verdict.committed,
                          failed_instances=verdict.failed, via=via)
        self._app.save(commitment)

    def report_failed(self, commitment: Commitment, attempt: int, error: str,
                      retry_at: float) -> None:
        commitment.fail_report(**Actor("system").ctx(), attempt=attempt, error=error[:500],
                               retry_at=retry_at)
        self._app.save(commitment)

    def abandoned(self, commitment: Commitment, attempt: int, reason: str) -> None:
        commitment.abandon(**Actor("system").ctx(), attempt=attempt, reason=reason[:500])
        self._app.save(commitment)
