"""How a process's DICOM side is built: the receiver, the query/retrieve handlers and the
storage commitment handler, and the pieces they share (secret box, event stores, blob store,
pynetdicom's configuration, address policy, access sessions), wired once here for every
process that answers DICOM.

The supervisor (:meth:`router.service.Router.build`) calls :func:`dicom_services` with what it
shares with its other parts: its views (a query waits for the runner's progress), the remote-node
state its API edits, its destination policy's addresses. A receiver process
(:mod:`router.dicom.receivers`) calls :func:`receiver_process`, which opens its own stores
(the receiver connection pools), blobs and views (opened on first use, waited for by polling
their positions) and then calls the same :func:`dicom_services`.

Receiver processes import this module: it imports nothing they did not need before (no
pydantic, no web/, no psycopg on SQLite); the views are opened lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from projections.db import ViewDatabase
from projections.freshness import FreshReads, LogHeads
from projections.jobs import JobsView
from projections.progress import PolledProgress
from projections.studies import StudiesView
from router.application.admin_state import AdminState
from router.application.receive import Receiver
from router.application.remote_nodes import RemoteState
from router.application.sessions import Sessions
from router.application.stores import EventStores, open_stores
from router.dicom.commitment_scp import CommitmentService, build_service
from router.dicom.qr_scp import LazyView, QueryRetrieveSCP
from router.dicom.tuning import DUL_IDLE_DELAY, configure_pynetdicom
from router.dispatch.ssrf import AddressPolicy
from router.secrets import SecretBox, load_master_key
from router.settings import Settings
from router.storage.blobs import BlobStore, open_blob_store


def open_box(settings: Settings) -> SecretBox:
    """The secret box of the master key (``secret_key`` or the data folder's key file)."""
    return SecretBox(load_master_key(settings.secret_key, settings.data_dir))


@dataclass(frozen=True)
class DicomServices:
    """What a DICOM listener of this process serves: C-STORE (the receiver), C-FIND/C-MOVE/
    C-GET and storage commitment."""

    receiver: Receiver
    qr: QueryRetrieveSCP
    commitment: CommitmentService


def dicom_services(settings: Settings, stores: EventStores, blobs: BlobStore, *,
                   admin: AdminState, remote: RemoteState, sessions: Sessions,
                   addresses: AddressPolicy, studies: Callable[[], ViewDatabase],
                   jobs: Callable[[], ViewDatabase], fresh: FreshReads,
                   on_saved: Callable[[], None]) -> DicomServices:
    """Configure pynetdicom for this process and build its DICOM handlers.

    ``studies`` and ``jobs`` give the views' databases (queries read the first, commitment
    checks the second); ``fresh`` waits for either to pass the logs' heads; ``on_saved`` is
    told of each saved receipt."""
    configure_pynetdicom(blobs.spool_dir, settings.dicom.max_incoming_pdu,
                         idle_delay=DUL_IDLE_DELAY)
    receiver = Receiver(stores, blobs, admin, settings.ingest, settings.dispatch,
                        on_saved=on_saved, node=settings.node_id)
    qr = QueryRetrieveSCP(settings.ae_title, settings.dicom.open_query_retrieve, remote,
                          studies, blobs, sessions, addresses, fresh)
    commitment = build_service(settings, stores, blobs, remote, sessions, jobs,
                               lambda: fresh.wait("jobs"), addresses)
    return DicomServices(receiver, qr, commitment)


@dataclass(frozen=True)
class ReceiverProcess:
    """Everything a receiver process opens, and closes when it stops."""

    stores: EventStores
    services: DicomServices
    views: tuple[LazyView, ...]  # opened on the first query or commitment check

    def close(self) -> None:
        self.services.commitment.stop()
        for view in self.views:
            view.close()
        self.stores.close()


def receiver_process(settings: Settings, on_saved: Callable[[], None]) -> ReceiverProcess:
    """The DICOM side of a receiver process: its own stores (``role="receiver"`` pools) and
    blob store (its own S3 client: made in this process), its own view of the remote nodes.

    It runs no views, so a query or a commitment check waits for its view by reading the
    view's positions (polled, see progress.py) rather than on the supervisor's runner."""
    box = open_box(settings)
    stores = open_stores(settings, box, role="receiver")
    blobs = open_blob_store(settings, box)
    studies = LazyView(settings.database_url, "studies")
    jobs = LazyView(settings.database_url, "jobs")
    fresh = FreshReads(LogHeads(stores.all()),
                       {"studies": StudiesView.follows, "jobs": JobsView.follows},
                       PolledProgress({"studies": studies, "jobs": jobs}))
    services = dicom_services(settings, stores, blobs, admin=AdminState(stores.admin),
                              remote=RemoteState(stores.admin), sessions=Sessions(stores),
                              addresses=AddressPolicy.from_settings(settings),
                              studies=studies, jobs=jobs, fresh=fresh, on_saved=on_saved)
    return ReceiverProcess(stores, services, (studies, jobs))
