"""Query/retrieve against remote nodes for users: C-ECHO, C-FIND, and retrieve jobs (C-MOVE to
our own AE title, or C-GET), each a Retrieve aggregate whose events record its progress.

Retrieved instances enter through the Receiver like any C-STORE (source ``retrieve``, actor =
the user who asked, the job's correlation id) and are routed by the rules. Every C-FIND and
retrieve is recorded in the access log before the remote is asked; no identifier is logged.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
import uuid
from typing import Any

from pydicom.dataset import Dataset

from router.application.commands import Actor, CommandError, NotFoundError
from router.application.receive import Receiver
from router.application.remote_nodes import RemoteNodeState, RemoteState, RetrieveState
from router.application.sessions import AccessRecord, Sessions
from router.application.stores import EventStores
from router.dicom.qr_scu import (
    UID_PATTERN,
    FindRequest,
    FindResult,
    QueryRetrieveScu,
    RemoteError,
    status_text,
)
from router.dicom.scp import Origin, StoreRequest, store_spooled
from router.dispatch.base import NOT_REACHED_MIN_SECONDS
from router.dispatch.ssrf import AddressPolicy
from router.domain.remote import Retrieve
from router.secrets import SecretBox
from router.settings import Settings

logger = logging.getLogger(__name__)

RUNNER = socket.gethostname()  # marks the jobs this host runs, to fail them after a restart
PARALLEL_RETRIEVES = 2
PROGRESS_EVERY = 2.0  # seconds between progress events of one job
TARGET_CONTEXT = "retrieve-target"


class Retriever:
    """Echo, find and retrieve jobs against remote nodes (one thread per running job)."""

    def __init__(self, settings: Settings, remote: RemoteState, stores: EventStores,
                 receiver: Receiver, sessions: Sessions, box: SecretBox) -> None:
        self._scu = QueryRetrieveScu(settings.ae_title, settings.dicom,
                                     AddressPolicy.from_settings(settings))
        self._remote = remote
        self._app = stores.admin
        self._receiver = receiver
        self._sessions = sessions
        self._box = box
        self._slots = threading.BoundedSemaphore(PARALLEL_RETRIEVES)
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()

    def echo(self, name: str) -> str:
        """C-ECHO the node; a short success text, or RemoteError saying what failed (not
        sooner than NOT_REACHED_MIN_SECONDS: the echo is the nodes' test button)."""
        node = self._node(name)
        started = time.monotonic()
        try:
            return self._scu.echo(node.config)
        except RemoteError:
            time.sleep(max(0.0, started + NOT_REACHED_MIN_SECONDS - time.monotonic()))
            raise

    def find(self, name: str, request: FindRequest, actor: Actor) -> FindResult:
        """C-FIND the node at study or series level; the access is recorded first."""
        node = self._node(name)
        identifier = request.identifier()
        exact_patient = request.patient_id and not any(c in request.patient_id for c in "*?")
        self._record(actor, AccessRecord(
            action="remote.find", object_type="remote_node", object_id=name,
            study_instance_uid=request.study_instance_uid or None,
            patient_id=request.patient_id if exact_patient else None,
            detail=f"level={request.level}"))
        return self._scu.find(node.config, identifier)

    def retrieve(self, name: str, method: str, study_uid: str, series_uid: str | None,
                 actor: Actor) -> str:
        """Start a C-MOVE or C-GET job for a study (or one of its series); the job's id."""
        node = self._node(name)
        if method not in ("move", "get"):
            raise CommandError("method must be move or get")
        if not UID_PATTERN.match(study_uid) or (series_uid and not UID_PATTERN.match(series_uid)):
            raise CommandError("Study/Series Instance UIDs are dot-separated numbers")
        if self._stopping.is_set():
            raise RemoteError("the router is stopping")
        level = "SERIES" if series_uid else "STUDY"
        target = self._box.seal(json.dumps({"study": study_uid, "series": series_uid}),
                                context=TARGET_CONTEXT)
        actor = Actor(actor.name, actor.source_ip, actor.correlation_id or str(uuid.uuid4()))
        job = Retrieve(**actor.ctx(), node=name, node_ae=node.config.ae_title, method=method,
                       level=level, target=target, message_id=secrets.randbelow(65535) + 1,
                       runner=RUNNER)
        self._record(actor, AccessRecord(
            action=f"remote.{method}", object_type="study", object_id=study_uid,
            study_instance_uid=study_uid, detail=f"node={name} level={level} job={job.id}"))
        self._app.save(job)
        self._remote.refresh()  # so that this process matches the sub-operations at once
        thread = threading.Thread(target=self._run, args=(job, node, study_uid, series_uid),
                                  name=f"retrieve-{method}", daemon=True)
        with self._lock:
            self._threads[str(job.id)] = thread
        thread.start()
        return str(job.id)

    def target_of(self, job: RetrieveState) -> dict[str, str | None]:
        """The Study/Series Instance UIDs a job retrieves (opened from its sealed target)."""
        return dict(json.loads(self._box.open(job.target, context=TARGET_CONTEXT)))

    def recover(self) -> int:
        """Fail this host's jobs that were still running when the router stopped."""
        failed = 0
        for job in self._remote.retrieves(limit=100_000):
            if job.running and job.runner == RUNNER and job.id not in self._threads:
                aggregate: Any = self._app.repository.get(uuid.UUID(job.id))
                _JobRecorder(self._app, aggregate).fail(
                    "interrupted: the router stopped before the retrieve ended", None)
                failed += 1
        if failed:
            self._remote.refresh()
        return failed

    def stop(self, timeout: float = 10.0) -> None:
        """Abort running retrieves (their jobs end as failed) and wait for their threads."""
        self._stopping.set()
        self._scu.abort_all()
        with self._lock:
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def _run(self, job: Retrieve, node: RemoteNodeState, study: str, series: str | None) -> None:
        recorder = _JobRecorder(self._app, job)
        try:
            with self._slots:
                if self._stopping.is_set():
                    raise RemoteError("the router stopped before the retrieve began")
                code = self._transfer(job, node, _identifier(job.level, study, series),
                                      recorder)
            recorder.finish(code)
        except RemoteError as exc:
            recorder.fail(str(exc), None)
        except Exception as exc:  # the job must end visibly, whatever happened
            logger.error("retrieve %s failed: %s", job.id, type(exc).__name__)
            recorder.fail(f"internal error ({type(exc).__name__})", None)
        finally:
            with self._lock:
                self._threads.pop(str(job.id), None)
            self._remote.refresh()

    def _transfer(self, job: Retrieve, node: RemoteNodeState, identifier: Dataset,
                  recorder: _JobRecorder) -> int:
        if job.method == "move":
            return self._scu.move(node.config, identifier, job.message_id, recorder.update)
        origin = Origin("retrieve", job.user, job.correlation_id)

        def on_store(event: Any) -> int:
            return store_spooled(StoreRequest.from_event(event), self._receiver, origin)

        return self._scu.get(node.config, identifier, job.message_id, on_store,
                             recorder.update)

    def _node(self, name: str) -> RemoteNodeState:
        node = self._remote.node(name)
        if node is None:
            raise NotFoundError(f"remote node {name!r} does not exist")
        return node

    def _record(self, actor: Actor, record: AccessRecord) -> None:
        try:
            self._sessions.record(actor, record)
        except Exception as exc:
            raise RemoteError(f"the access could not be recorded ({type(exc).__name__}); "
                              "nothing was asked of the remote node") from None


def _identifier(level: str, study: str, series: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    return ds


def _count(status: Dataset, keyword: str, default: int) -> int:
    value = status.get(keyword)
    return default if value is None or value == "" else int(value)


class _JobRecorder:
    """Records a job's counts: pending ones at most every PROGRESS_EVERY s, the end always."""

    def __init__(self, app: Any, job: Retrieve) -> None:
        self._app = app
        self._job = job
        self._saved = 0.0
        self.completed, self.failed, self.warning = (int(job.counts.get(k, 0)) for k in (
            "completed", "failed", "warning"))

    def update(self, status: Dataset) -> None:
        """A C-MOVE/C-GET response: read its counts; save pending ones now and then."""
        self.completed = _count(status, "NumberOfCompletedSuboperations", self.completed)
        self.failed = _count(status, "NumberOfFailedSuboperations", self.failed)
        self.warning = _count(status, "NumberOfWarningSuboperations", self.warning)
        pending = status.get("Status") in (0xFF00, 0xFF01)
        if pending and time.monotonic() - self._saved >= PROGRESS_EVERY:
            remaining = _count(status, "NumberOfRemainingSuboperations", -1)
            self._job.progress(actor=self._job.user, source_ip="",
                               correlation_id=self._job.correlation_id,
                               completed=self.completed, failed=self.failed,
                               warning=self.warning, remaining=remaining)
            self._app.save(self._job)
            self._saved = time.monotonic()

    def finish(self, code: int) -> None:
        """Success, or warning 0xB000 (some sub-operations failed): completed; else failed."""
        if code not in (0x0000, 0xB000):
            self.fail(f"the remote node answered {status_text(code)}", code)
            return
        self._job.complete(actor=self._job.user, source_ip="",
                           correlation_id=self._job.correlation_id, completed=self.completed,
                           failed=self.failed, warning=self.warning, status=code)
        self._app.save(self._job)

    def fail(self, reason: str, code: int | None) -> None:
        self._job.fail(actor=self._job.user, source_ip="",
                       correlation_id=self._job.correlation_id, reason=reason,
                       completed=self.completed, failed=self.failed, warning=self.warning,
                       status=code)
        self._app.save(self._job)


__all__ = ["FindRequest", "FindResult", "RemoteError", "Retriever"]
