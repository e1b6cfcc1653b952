"""The composition root of the write side: builds stores, views, receiver, dispatcher and the
DICOM listener from Settings, starts them in order and stops them gracefully.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from projections import jobs_queries
from projections.audit import AuditView
from projections.db import ViewDatabase, open_views
from projections.freshness import FreshReads, LogHeads
from projections.jobs import JobsView
from projections.positions import view_positions
from projections.runner import VIEWS_CHANNEL, ProjectionRunner, View, ViewHandle, ensure_schema
from projections.studies import StudiesView
from router.ai.callbacks import AICallbacks
from router.ai.requests import AIRequests
from router.ai.worker import AIWorker
from router.application.admin_state import AdminState, DestinationState
from router.application.commands import Actor, Commands
from router.application.receive import Receiver
from router.application.reidentification import ReidentificationMap
from router.application.remote_nodes import RemoteNodes, RemoteState
from router.application.retention import Retention
from router.application.retrieve import Retriever
from router.application.runtime_settings import RuntimeSettingsStore
from router.application.sessions import Sessions
from router.application.stores import APP_NAMES, EventStores, open_stores
from router.application.users import Users
from router.atna.messages import Source
from router.atna.sender import AtnaSender, tls_context_for
from router.cluster.leadership import Leadership, leadership_for
from router.cluster.nodes import NodeRegistry
from router.cluster.schema import schema_lock
from router.cluster.serving import ServingLock
from router.dicom.commitment_scp import CommitmentWorker
from router.dicom.gate import Gate
from router.dicom.receivers import ReceiverPool
from router.dicom.refusals import RefusalRecorder
from router.dicom.scp import DicomServer
from router.dicom.tls import TlsConfigError
from router.dispatch.base import Adapter
from router.dispatch.dispatcher import Dispatcher
from router.dispatch.policy import DestinationPolicy
from router.dispatch.registry import build_adapter
from router.dispatch.transforming import SendTransforms
from router.dispatch.units import UnitScheduler
from router.domain.activity import NodeActivity
from router.secrets import SecretBox
from router.settings import Settings, SettingsError
from router.storage.blobs import BlobStore, open_blob_store
from router.wiring import dicom_services, open_box

logger = logging.getLogger(__name__)

VIEW_CLASSES: dict[str, type[View]] = {"jobs": JobsView, "studies": StudiesView,
                                       "audit": AuditView}
ViewName = Literal["jobs", "studies", "audit"]


def open_all_views(settings: Settings) -> dict[str, ViewHandle]:
    return {name: ViewHandle(cls(), open_views(settings.database_url, name))
            for name, cls in VIEW_CLASSES.items()}


@dataclass
class Router:
    """Everything one router process runs, wired together."""

    settings: Settings
    box: SecretBox
    stores: EventStores
    blobs: BlobStore
    admin: AdminState
    commands: Commands
    views: dict[str, ViewHandle]
    runner: ProjectionRunner
    receiver: Receiver
    dispatcher: Dispatcher
    dicom: DicomServer
    users: Users
    sessions: Sessions
    runtime: RuntimeSettingsStore
    retention: Retention
    remote_nodes: RemoteNodes
    retriever: Retriever
    units: UnitScheduler
    ai_requests: AIRequests
    ai_worker: AIWorker
    ai_callbacks: AICallbacks
    policy: DestinationPolicy  # where destinations and remote nodes may connect and write
    fresh: FreshReads  # read-your-writes: queries wait for their view to pass the logs' heads
    nodes: NodeRegistry  # the nodes sharing this database (health page)
    duties: Leadership  # what this node does for the cluster (views, destinations, timers)
    commitments: CommitmentWorker  # storage commitment reports no receiving thread sends
    reidentification: ReidentificationMap  # pseudonyms of de-identification projects
    ready: bool = False
    receivers: ReceiverPool | None = None
    serving: ServingLock | None = None  # held shared while started: no rebuild meanwhile
    atna: AtnaSender | None = None  # audit messages to a repository ([atna], docs/atna.md)
    activity: NodeActivity | None = None  # this run, recorded at start and stop
    refusals: RefusalRecorder | None = None  # refused associations, counted per minute

    @classmethod
    def build(cls, settings: Settings, clock: Callable[[], float] = time.time) -> Router:
        """Wire a router; ``clock`` (Unix seconds) drives series/study stability and retries."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:  # before anything is opened: a missing certificate file stops the start
            atna_tls = tls_context_for(settings.atna) if settings.atna.enabled else None
        except TlsConfigError as exc:
            raise SettingsError(f"atna: {exc}") from None
        box = open_box(settings)
        blobs = open_blob_store(settings, box, check=True)  # an unusable bucket: no start
        duties = leadership_for(settings.database_url, settings.node_id)
        with schema_lock(settings.database_url):  # nodes starting together
            stores = open_stores(settings, box)
            views = open_all_views(settings)
            nodes = NodeRegistry(views["jobs"].db, settings.node_id,
                                 dicom_port=settings.dicom_port, http_port=settings.http_port,
                                 duties=duties.held)
            if settings.manage_schema:  # else migrate made them, as their owner
                for handle in views.values():
                    ensure_schema(handle.view, handle.db)
                nodes.ensure_table()
        admin = AdminState(stores.admin)
        runner = ProjectionRunner(list(views.values()), stores.all(),
                                  # Each PostgreSQL batch costs round trips per followed
                                  # log: longer pauses make fewer, larger batches (queries
                                  # that wait for a view end the pause: hurry()).
                                  coalesce=0.2 if settings.is_postgres else 0.05,
                                  leads=lambda view: duties.holds(f"view:{view}"),
                                  manage_schema=settings.manage_schema)
        fresh = FreshReads(LogHeads(stores.all(), settings.database_url),
                           {name: handle.view.follows for name, handle in views.items()},
                           runner.progress, hurry=runner.hurry)
        jobs_db = views["jobs"].db
        policy = DestinationPolicy.from_settings(settings)
        sessions = Sessions(stores)
        remote_nodes = RemoteNodes(stores, RemoteState(stores.admin), policy)
        served = dicom_services(settings, stores, blobs, admin=admin, remote=remote_nodes.state,
                                sessions=sessions, addresses=policy.addresses,
                                studies=lambda: views["studies"].db, jobs=lambda: jobs_db,
                                fresh=fresh, on_saved=runner.wake)  # the runner's progress
        receiver, commitment = served.receiver, served.commitment

        def make_adapter(state: DestinationState) -> Adapter:
            return build_adapter(state.config, box, calling_ae=settings.ae_title, policy=policy)

        reidentification = ReidentificationMap(stores.delivery, box)
        transforms = SendTransforms(admin, reidentification,
                                    settings.data_dir / "transform-scratch")
        dispatcher = Dispatcher(stores, jobs_db, admin, blobs, settings.dispatch, make_adapter,
                                clock=clock, on_saved=runner.wake, node=settings.node_id,
                                leads=lambda name: duties.holds(f"destination:{name}"),
                                settle=lambda: fresh.wait("jobs", 10.0), transforms=transforms)
        units = UnitScheduler(stores, jobs_db, admin, clock=clock,
                              poll_interval=settings.dispatch.poll_interval, on_saved=runner.wake,
                              leads=lambda: duties.holds("units"))
        runner.add_listener(lambda view: dispatcher.wake() if view == "jobs" else None)
        runner.add_listener(lambda view: units.wake() if view == "jobs" else None)
        ai_requests = AIRequests(stores.delivery, jobs_db, admin, blobs, box,
                                 settings.ai.public_url or _default_public_url(settings),
                                 policy.ai_addresses, node=settings.node_id)
        ai_worker = AIWorker(ai_requests, jobs_db, admin, settings.dispatch, clock=clock,
                             on_saved=runner.wake, leads=lambda: duties.holds("ai"))
        runner.add_listener(lambda view: ai_worker.wake() if view == "jobs" else None)
        runtime = RuntimeSettingsStore(stores, settings)
        retention = Retention(stores, jobs_db, blobs, runtime, on_saved=runner.wake,
                              leads=lambda: duties.holds("retention"))
        commitments = CommitmentWorker(commitment, jobs_db, settings.node_id,
                                       leads=lambda: duties.holds("commitments"))
        return cls(settings=settings, box=box, stores=stores, blobs=blobs, admin=admin,
                   commands=Commands(stores, admin, box, policy), views=views, runner=runner,
                   receiver=receiver, dispatcher=dispatcher,
                   dicom=DicomServer(settings, receiver, qr=served.qr, commitment=commitment),
                   commitments=commitments,
                   users=Users(stores, admin, settings.web), sessions=sessions,
                   runtime=runtime, retention=retention, remote_nodes=remote_nodes,
                   retriever=Retriever(settings, remote_nodes.state, stores, receiver,
                                       sessions, box), units=units,
                   ai_requests=ai_requests, ai_worker=ai_worker,
                   ai_callbacks=AICallbacks(ai_requests, stores.ingest, admin, blobs, receiver),
                   policy=policy, fresh=fresh, nodes=nodes, duties=duties,
                   atna=_atna_sender(settings, views["audit"].db, runner, duties, atna_tls),
                   reidentification=reidentification)

    def apply_config_file(self) -> dict[str, int]:
        return self.commands.apply(self.settings.destinations, self.settings.rules,
                                   transforms=self.settings.transforms)

    def start(self) -> None:
        """Apply the TOML config, catch the views up, recover blobs, then open for traffic."""
        self.serving = ServingLock(self.settings)
        self.serving.hold_shared()  # `projections rebuild` refuses while a router holds it
        if self.settings.destinations or self.settings.rules or self.settings.transforms:
            changed = self.apply_config_file()
            logger.info("configuration applied: %s", changed)
            if changed["detached"]:
                logger.warning("%d item(s) of the configuration file were detached from it in "
                               "the UI or API and were left as they are", changed["detached"])
        if self.settings.remote_nodes:
            logger.info("remote nodes applied: %s",
                        self.remote_nodes.apply(self.settings.remote_nodes))
        self.retriever.recover()
        generated = self.users.ensure_first_admin(self.settings.admin_password)
        if generated is not None:
            # Printed once, to the console only (not to the log, which may be shipped).
            print(f"\n  First start: created user 'admin' with password: {generated}\n"
                  "  Change it after logging in (or set DICOM_ROUTER_ADMIN_PASSWORD).\n",
                  file=sys.stderr, flush=True)
        self.runner.catch_up()
        jobs_db = self.view_db("jobs")
        self.blobs.recover(lambda sha: jobs_queries.job_exists_with_blob(jobs_db, sha))
        self.runner.start()
        if self.settings.is_postgres:
            self.runner.listen(self.settings.database_url,
                               [f"{name}_events" for name in APP_NAMES] + [VIEWS_CHANNEL])
        self.dispatcher.start()
        self.units.start()
        self.ai_worker.start()
        self.retention.start()  # purges hourly while storage.retention_days > 0
        self.commitments.start()  # reports outstanding from before this start, retries
        self._record_start()
        if self.atna is not None:
            self.atna.start()
        self._start_receiving()
        self._audit_refusals()
        self.nodes.start(dicom_port=self.receivers.port if self.receivers is not None
                         else self.dicom.port)
        self.ready = True
        logger.info("router started")

    def _start_receiving(self) -> None:
        count = self.settings.dicom.processes
        if count == 0:
            self.dicom.start()
            return
        self.receivers = ReceiverPool(self.settings, count, on_saved=self.runner.wake)
        self.receivers.start()

    def stop(self) -> None:
        """Stop accepting, finish in-flight C-STOREs and deliveries, flush the views."""
        self.ready = False
        grace = self.settings.dispatch.shutdown_grace
        self.retriever.stop(timeout=min(grace, 10.0))
        if self.receivers is not None:
            self.receivers.stop(grace=min(grace, 10.0))
        else:
            self.dicom.stop(grace=min(grace, 10.0))
        self.units.stop()
        self.commitments.stop()
        self.ai_worker.stop()
        self.dispatcher.stop(grace=grace)
        self.retention.stop()
        self.nodes.stop()
        if self.refusals is not None:
            self.refusals.stop()  # saves the last minute's count
        self._record_stop()
        self.runner.stop()
        if self.atna is not None:
            self.atna.stop()  # after the views' last batch (the stop's row may go out)
        self.duties.close()  # after the views' last batch: another node takes them over
        self.fresh.close()
        for handle in self.views.values():
            handle.db.close()
        self.stores.close()
        if self.serving is not None:
            self.serving.release()
        logger.info("router stopped")

    def _audit_refusals(self) -> None:
        """Refused associations go to the access log, counted per minute (refusals.py)."""
        gate = self.gate
        if gate is None:
            return

        def save(events: list[Any]) -> None:
            self.stores.access.save(*events)
            self.runner.wake()

        self.refusals = RefusalRecorder(save, self.settings.node_id)
        gate.on_refused = self.refusals.note
        self.refusals.start()

    def _record_start(self) -> None:
        """NodeActivity.Started in the access log (ATNA's Application Start)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("dicom-router")
        except PackageNotFoundError:
            ours = "unknown"
        self.activity = NodeActivity(**Actor("system").ctx(), node=self.settings.node_id,
                                     ae_title=self.settings.ae_title, version=ours)
        self.stores.access.save(self.activity)
        self.runner.wake()

    def _record_stop(self) -> None:
        if self.activity is None:
            return
        try:
            self.activity.stop(**Actor("system").ctx(), node=self.settings.node_id)
            self.stores.access.save(self.activity)
        except Exception as exc:  # the stop goes on: the log may be what failed
            logger.error("could not record this node's stop: %s", type(exc).__name__)

    def view_db(self, name: ViewName) -> ViewDatabase:
        """The database of view ``name``, where its queries read."""
        return self.views[name].db

    @property
    def gate(self) -> Gate | None:
        """The DICOM front door, once receiving has started."""
        return self.receivers.gate if self.receivers is not None else self.dicom.gate

    def health(self) -> dict[str, Any]:
        """What /readyz reports: event store reachable, views' lag, listener up."""
        lag: dict[str, int] = {}
        for name, handle in self.views.items():
            done = view_positions(handle.db, name)
            lag[name] = sum(
                max(0, (self.stores.by_name(app).recorder.max_notification_id() or 0)
                    - done.get(app, 0))
                for app in handle.view.follows
            )
        receiving = self.receivers.alive() if self.receivers is not None else True
        health = {"ready": self.ready and receiving, "node": self.settings.node_id,
                  "receivers_alive": receiving, "view_lag": lag}
        if self.atna is not None:
            health["atna"] = self.atna.state()
        return health


def _atna_sender(settings: Settings, audit_db: ViewDatabase, runner: ProjectionRunner,
                 duties: Leadership, context: ssl.SSLContext | None) -> AtnaSender | None:
    """The ATNA sender when ``[atna] host`` is set; woken as the audit view moves."""
    if not settings.atna.enabled:
        return None
    source = Source(audit_source_id=settings.atna.audit_source_id or settings.ae_title,
                    ae_title=settings.ae_title, host=settings.node_id,
                    enterprise_site_id=settings.atna.enterprise_site_id)
    sender = AtnaSender(settings.atna, audit_db, source, leads=lambda: duties.holds("atna"),
                        context=context)
    runner.add_listener(lambda view: sender.wake() if view == "audit" else None)
    return sender


def _default_public_url(settings: Settings) -> str:
    """Where AI processors reach us when ``[ai] public_url`` is not set: this host's name."""
    host = settings.http_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - compared, not bound
        host = socket.getfqdn()
    return f"http://{host}:{settings.http_port}"

