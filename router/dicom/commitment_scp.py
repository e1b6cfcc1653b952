"""Storage Commitment Push Model as SCP (PS3.4 Annex J): the N-ACTION handler, and the
N-EVENT-REPORT that answers it, on the requester's association while it is open, else on a new
association to the requester (a known remote node), retried with backoff.

The handler records the request and answers at once; a thread of the process that received it
then waits for the verdict (the instances received, or delivered to the archive destination,
or the deadline) and sends the report. :class:`CommitmentWorker` (in the serving process) sends
the reports of requests whose thread is gone: after a restart, and the retries.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from projections.commitments_queries import pending_commitments
from projections.db import ViewDatabase
from router.application.commands import Actor
from router.application.commitments import (
    INVALID_ARGUMENT,
    NOT_AUTHORISED,
    PROCESSING_FAILURE,
    CommitmentChecker,
    CommitmentRefused,
    CommitmentRequest,
    Commitments,
    DuplicateTransaction,
    Verdict,
    parse_request,
)
from router.application.remote_nodes import RemoteState
from router.application.sessions import AccessRecord, Sessions
from router.application.stores import EventStores
from router.dicom.qr_scp import IDENTIFIER_SYNTAXES
from router.dicom.qr_scu import QueryRetrieveScu
from router.dicom.scp import STORAGE_CLASSES
from router.dicom.tuning import pause_reactor, resume_reactor
from router.dispatch.ssrf import AddressPolicy
from router.domain.commitment import Commitment
from router.settings import Settings
from router.storage.blobs import BlobStore

logger = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # PS3.4 J.3.5
SAME, NEW = "same association", "new association"
RETRY_DELAYS = (30.0, 60.0, 300.0, 900.0, 1800.0)  # then abandoned
POLL = 1.0  # seconds between looks at the deliveries, in archive mode
# A requester that releases right after the N-ACTION response wants its report on a new
# association; one that keeps the association this long after it waits for the report on it.
SAME_ASSOCIATION_GRACE = 0.5
STALE = 300.0  # after its deadline, a pending request of another node is taken over


def report_dataset(transaction_uid: str, verdict: Verdict) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if verdict.committed:
        ds.ReferencedSOPSequence = [_item(c, i) for c, i in verdict.committed]
    if verdict.failed:
        ds.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in verdict.failed]
    return ds


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


class CommitmentService:
    """The N-ACTION handler and the reporting of one process."""

    def __init__(self, commitments: Commitments, checker: CommitmentChecker,
                 remote: RemoteState, sessions: Sessions,
                 send_new: Callable[[Any, Dataset, int], None]) -> None:
        self._commitments = commitments
        self._checker = checker
        self._remote = remote
        self._sessions = sessions
        self._send_new = send_new
        self._running: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @staticmethod
    def add_contexts(ae: AE) -> None:
        ae.add_supported_context(StorageCommitmentPushModel, IDENTIFIER_SYNTAXES)

    def handlers(self) -> list[Any]:
        return [(evt.EVT_N_ACTION, self.handle_action)]

    def stop(self) -> None:
        self._stop.set()

    # -- N-ACTION -------------------------------------------------------------------------

    def handle_action(self, event: Any) -> tuple[Dataset, None]:
        requestor = event.assoc.requestor
        actor = Actor(str(requestor.ae_title).strip(), str(requestor.address))
        try:
            commitment = self._accept(event, actor)
        except DuplicateTransaction as exc:
            self._refuse(actor, exc.status, exc.reason)  # logged and audited
            self._report_duplicate(exc.request, actor.name, event.assoc)
            return _status(0x0000), None
        except CommitmentRefused as exc:
            return self._refuse(actor, exc.status, exc.reason), None
        self._start(commitment.id, event.assoc)
        return _status(0x0000), None

    def _accept(self, event: Any, actor: Actor) -> Commitment:
        instance = str(getattr(event.request, "RequestedSOPInstanceUID", "") or "")
        if instance != WELL_KNOWN_INSTANCE:
            raise CommitmentRefused(0x0117, "Requested SOP Instance UID is not the well-known"
                                    f" instance {WELL_KNOWN_INSTANCE}")
        if self._remote.node_for_ae(actor.name, recheck=True) is None:
            raise CommitmentRefused(NOT_AUTHORISED, f"calling AE title {actor.name!r} is not"
                                    " a known remote node: no report could be sent to it")
        try:
            request = parse_request(getattr(event, "action_type", None),
                                    event.action_information)
        except CommitmentRefused:
            raise
        except Exception:  # pydicom raises many types for a data set it cannot decode
            raise CommitmentRefused(INVALID_ARGUMENT, "the Action Information could not be"
                                    " decoded") from None
        try:
            return self._commitments.record_request(
                actor, actor.name, str(event.assoc.acceptor.ae_title).strip(), request)
        except CommitmentRefused:
            raise
        except Exception as exc:
            logger.error("storage commitment request not recorded: %s", type(exc).__name__)
            raise CommitmentRefused(PROCESSING_FAILURE, "the request could not be recorded;"
                                    " try again") from None

    def _refuse(self, actor: Actor, status: int, reason: str) -> Dataset:
        logger.warning("storage commitment from %s refused (0x%04X): %s", actor.name, status,
                       reason)
        try:
            self._sessions.record(actor, AccessRecord(
                action="dimse.commitment", object_type="commitment", outcome="denied",
                detail=f"0x{status:04X} {reason}"))
        except Exception as exc:
            logger.error("refusal not recorded: %s", type(exc).__name__)
        return _status(status, reason)

    # -- reporting ------------------------------------------------------------------------

    def _start(self, commitment_id: uuid.UUID, assoc: Any = None) -> bool:
        """Report in a thread of its own; False when one is reporting it already."""
        with self._lock:
            if commitment_id in self._running:
                return False
            self._running.add(commitment_id)
        threading.Thread(target=self._report, args=(commitment_id, assoc, time.monotonic()),
                         daemon=True,
                         name=f"commitment-{str(commitment_id)[:8]}").start()
        return True

    def resume(self, commitment_id: uuid.UUID) -> bool:
        """Send the report of a recorded request (after a restart, or a retry)."""
        return self._start(commitment_id)

    def _report(self, commitment_id: uuid.UUID, assoc: Any, started: float) -> None:
        try:
            commitment = self._commitments.load(commitment_id)
            if commitment is None or commitment.status != "pending":
                return
            verdict = self._verdict(commitment)
            if verdict is None:
                return  # stopping: the worker resumes it after the restart
            if assoc is not None and self._send_same(assoc, commitment.transaction_uid,
                                                     verdict, started):
                self._commitments.reported(commitment, verdict, SAME)
                return
            self._report_new(commitment, verdict)
        except Exception:
            logger.exception("storage commitment report failed")
        finally:
            with self._lock:
                self._running.discard(commitment_id)

    def _verdict(self, commitment: Commitment) -> Verdict | None:
        """Wait (polling, until the deadline at most) for every reference to be decided."""
        while True:
            final = time.time() >= commitment.deadline
            verdict = self._checker.check(commitment.references, commitment.destination, final)
            if verdict.settled:
                return verdict
            wait = min(POLL, max(0.0, commitment.deadline - time.time()))
            if self._stop.wait(wait):
                return None

    def _report_duplicate(self, request: CommitmentRequest, calling_aet: str,
                          assoc: Any) -> None:
        """The 0x0131 report of a reused Transaction UID: on the association if it stays
        open, else one attempt on a new one (it is not recorded: the UID's record is the
        earlier request's)."""
        verdict, started = Verdict.duplicate(request), time.monotonic()

        def send() -> None:
            if self._send_same(assoc, request.transaction_uid, verdict, started):
                return
            try:
                self._send_to_requester(calling_aet, request.transaction_uid, verdict)
            except Exception as exc:
                logger.warning("duplicate Transaction UID report to %s not sent: %s",
                               calling_aet, str(exc) or type(exc).__name__)

        threading.Thread(target=send, daemon=True, name="commitment-duplicate").start()

    def _send_same(self, assoc: Any, transaction_uid: str, verdict: Verdict,
                   started: float) -> bool:
        """On the requester's association, if it is still open and answers success."""
        if self._stop.wait(max(0.0, started + SAME_ASSOCIATION_GRACE - time.monotonic())):
            return False
        if not assoc.is_established or not pause_reactor(assoc):
            return False
        try:
            status, _ = assoc.send_n_event_report(
                report_dataset(transaction_uid, verdict), verdict.event_type,
                StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        except Exception as exc:  # closed meanwhile, no context: a new association then
            logger.info("commitment report not sent on the same association: %s", exc)
            return False
        finally:
            resume_reactor(assoc)
        return bool(status) and status.get("Status") == 0x0000

    def _send_to_requester(self, calling_aet: str, transaction_uid: str,
                           verdict: Verdict) -> None:
        """On a new association to the requesting AE, which must still be a remote node."""
        node = self._remote.node_for_ae(calling_aet, recheck=True)
        if node is None:
            raise RuntimeError(f"{calling_aet} is no longer a remote node")
        self._send_new(node.config, report_dataset(transaction_uid, verdict), verdict.event_type)

    def _report_new(self, commitment: Commitment, verdict: Verdict) -> None:
        attempt = commitment.attempts + 1
        try:
            self._send_to_requester(commitment.calling_aet, commitment.transaction_uid, verdict)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            logger.warning("commitment report to %s failed (attempt %d): %s",
                           commitment.calling_aet, attempt, error)
            if attempt > len(RETRY_DELAYS):
                self._commitments.abandoned(commitment, attempt, f"given up after {attempt}"
                                            f" attempts; last error: {error}")
            else:
                self._commitments.report_failed(commitment, attempt, error,
                                                time.time() + RETRY_DELAYS[attempt - 1])
            return
        self._commitments.reported(commitment, verdict, NEW)


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


class CommitmentWorker:
    """In the serving process: sends the reports no thread is sending (requests of this node
    from before its start, due retries, and other nodes' requests long past their deadline)."""

    def __init__(self, service: CommitmentService, jobs: ViewDatabase, node: str,
                 leads: Callable[[], bool] = lambda: True, interval: float = 1.0) -> None:
        self._service = service
        self._jobs = jobs
        self._node = node
        self._leads = leads
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def start(self) -> None:
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="commitments", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._service.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:
                logger.warning("commitment worker: %s", type(exc).__name__)
            self._stop.wait(self._interval)

    def run_once(self) -> int:
        """Start the reports that are due; how many were started."""
        now, started = time.time(), 0
        rows = pending_commitments(self._jobs)
        for row in rows:
            if self._due(row, now) and self._service.resume(uuid.UUID(row["commitment_id"])):
                started += 1
        return started

    def _due(self, row: Any, now: float) -> bool:
        if row["next_attempt_at"] is not None:
            return bool(row["next_attempt_at"] <= now and self._leads())
        if row["node"] == self._node and row["requested_at"] < self._started_at:
            return True  # its thread ended with the previous run of this node
        return bool(now > row["deadline"] + STALE and self._leads())


def build_service(settings: Settings, stores: EventStores, blobs: BlobStore,
                  remote: RemoteState, sessions: Sessions, jobs: Callable[[], ViewDatabase],
                  settle: Callable[[], Any], addresses: AddressPolicy) -> CommitmentService:
    """The commitment handler of one process, reading the jobs view ``jobs``."""
    scu = QueryRetrieveScu(settings.ae_title, settings.dicom, addresses)

    def send_new(node: Any, dataset: Dataset, event_type: int) -> None:
        scu.event_report(node, dataset, event_type, StorageCommitmentPushModel,
                         WELL_KNOWN_INSTANCE)

    commitments = Commitments(stores, settings.dicom.commitment_destination,
                              settings.dicom.commitment_timeout, settings.node_id)
    checker = CommitmentChecker(jobs, blobs, settle, STORAGE_CLASSES)
    return CommitmentService(commitments, checker, remote,
                             sessions, send_new)
