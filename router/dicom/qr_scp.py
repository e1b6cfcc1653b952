"""Query/retrieve as a node: C-FIND, C-MOVE and C-GET handlers on the Patient Root and Study
Root models, answered from the studies view and the blob store.

Only remote nodes allowed the service may ask (unless ``dicom.open_query_retrieve``); a C-MOVE
goes only to a remote node's AE title. Every request is recorded in the access log before any
PHI is sent; if that record cannot be written, nothing is sent. Identifiers are never logged.

A query first waits (at most 2 s) for the studies view to hold every receipt acknowledged
before it came (projections/freshness.py). C-FIND has no status that says "answered from a
view that lags", so after that wait the answer is what the view holds, and the lag is logged
and noted in the access record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from projections.db import ViewDatabase
from projections.freshness import FreshReads
from router.application.commands import Actor
from router.application.remote_nodes import RemoteNodeState, RemoteState, RetrieveState
from router.application.sessions import AccessRecord, Sessions
from router.dicom.qr_matching import (
    RETRIEVE_COLUMNS,
    Query,
    QueryError,
    parse_query,
    require_unique_key,
    response_identifier,
    run_query,
)
from router.dicom.tls import TlsClientSettings, TlsConfigError
from router.dicom.tuning import CONNECTION_HANDLERS
from router.dispatch.base import DeliveryError, Outgoing
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError
from router.dispatch.transcode import decoded_for_peer
from router.storage.blobs import BlobStore

logger = logging.getLogger(__name__)

FIND_MODELS = {PatientRootQueryRetrieveInformationModelFind: "patient",
               StudyRootQueryRetrieveInformationModelFind: "study"}
MOVE_MODELS = {PatientRootQueryRetrieveInformationModelMove: "patient",
               StudyRootQueryRetrieveInformationModelMove: "study"}
GET_MODELS = {PatientRootQueryRetrieveInformationModelGet: "patient",
              StudyRootQueryRetrieveInformationModelGet: "study"}
MAX_FIND_MATCHES = 5000
MAX_RETRIEVE_INSTANCES = 65535  # the sub-operation counts are US
MAX_MOVE_CONTEXTS = 127
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_NOT_AUTHORISED = 0x0124
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# For identifiers and other request data sets: not Deflated Explicit VR Little Endian, which
# pynetdicom would inflate without bound (its default list offers it).
IDENTIFIER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


class MoveRefusedError(Exception):
    """A C-MOVE refused before any destination association (logged by us, not pynetdicom)."""


class _Refusing(threading.local):
    active = False


_refusing = _Refusing()


class _MoveRefusalFilter(logging.Filter):
    """Drops pynetdicom's error and traceback for a C-MOVE we refuse on purpose (the refusal
    is logged by us, without a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _refusing.active:
            return True
        error = record.exc_info[1] if record.exc_info else record.msg
        if isinstance(error, MoveRefusedError):
            _refusing.active = False  # the last of the two records pynetdicom writes
        return False


_FILTER = _MoveRefusalFilter()


@dataclass(frozen=True)
class Peer:
    """Who sent a request: calling AE title and IP address."""

    ae_title: str
    address: str

    @property
    def actor(self) -> Actor:
        return Actor(self.ae_title, self.address)


def _peer(event: Any) -> Peer:
    requestor = event.assoc.requestor
    return Peer(str(requestor.ae_title).strip(), str(requestor.address))


class QueryRetrieveSCP:
    """The C-FIND/C-MOVE/C-GET handlers of one DICOM listener (any receiver process)."""

    def __init__(self, ae_title: str, open_to_all: bool, remote: RemoteState,
                 studies: Callable[[], ViewDatabase], blobs: BlobStore,
                 sessions: Sessions, policy: AddressPolicy,
                 fresh: FreshReads | None = None) -> None:
        self._ae_title = ae_title
        self._fresh = fresh
        self._policy = policy  # C-MOVE sub-operations connect to the destination node
        self._open = open_to_all
        self._remote = remote
        self._studies = studies
        self._blobs = blobs
        self._sessions = sessions
        service_log = logging.getLogger("pynetdicom.service_class")
        if _FILTER not in service_log.filters:
            service_log.addFilter(_FILTER)

    @property
    def remote(self) -> RemoteState:
        return self._remote

    @staticmethod
    def add_contexts(ae: AE) -> None:
        """The Q/R models we answer (storage contexts for C-GET are added with SCP roles)."""
        for model in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
            ae.add_supported_context(model, IDENTIFIER_SYNTAXES)

    def handlers(self) -> list[Any]:
        return [(evt.EVT_C_FIND, self.handle_find), (evt.EVT_C_MOVE, self.handle_move),
                (evt.EVT_C_GET, self.handle_get)]

    # -- C-STORE sub-operations of our own C-MOVEs ----------------------------------------

    def retrieve_of(self, calling: str, originator: str,
                    originator_message_id: int | None) -> RetrieveState | None:
        """The retrieve job an incoming C-STORE belongs to, when it is a sub-operation of a
        C-MOVE we asked for (Move Originator = our AE, or not given by the remote)."""
        if originator == self._ae_title:
            return self._remote.running_for(calling, originator_message_id)
        if not originator:
            return self._remote.running_for(calling, None)
        return None

    # -- C-FIND ---------------------------------------------------------------------------

    def handle_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        peer = _peer(event)
        model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "study")
        if not self._allowed(peer, "find"):
            self._refusal(peer, "dimse.find", "calling AE not allowed to query")
            yield STATUS_NOT_AUTHORISED, None
            return
        try:
            query = parse_query(_identifier(event), model)
            lag = self._view_lag("dimse.find")
            rows = run_query(self._studies(), query, MAX_FIND_MATCHES)
        except QueryError as exc:
            self._refusal(peer, "dimse.find", str(exc), outcome="failure")
            yield exc.status, None
            return
        if not self._record(peer, "dimse.find", query, f"matches={len(rows)}{lag}"):
            yield STATUS_OUT_OF_RESOURCES, None
            return
        for row in rows:
            _let_replies_go(event.assoc)
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, response_identifier(query, row, self._ae_title)

    # -- C-MOVE ---------------------------------------------------------------------------

    def handle_move(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
        model = MOVE_MODELS.get(str(event.request.AffectedSOPClassUID), "study")
        destination = self._remote.node_for_ae(str(event.move_destination or ""), recheck=True)
        if destination is None:
            self._refusal(peer, "dimse.move", "move destination is not a remote node")
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        suffix = f" destination={destination.config.ae_title}"
        status, rows = self._retrieve_request(event, peer, "move", model, suffix)
        if status is not None:
            # pynetdicom sends a C-MOVE status only after associating with the destination;
            # refusing before that is an exception, answered 0xC514 (unable to process).
            _refusing.active = True
            raise MoveRefusedError(f"refused with 0x{status:04X}")
        address = self._move_address(peer, destination)
        tls = self._move_tls(peer, destination) if address is not None else None
        if address is None or tls is False:
            yield None, None  # 0xA801, as pynetdicom answers when the destination is not reached
            return
        accepted: dict[str, set[str]] = {}
        yield self._move_association(destination, address, rows, accepted,
                                     None if tls is True else tls)
        yield len(rows)
        yield from self._sub_operations(event, rows, accepted, destination.config.ae_title)

    def _move_address(self, peer: Peer, node: RemoteNodeState) -> str | None:
        """The destination node's address, resolved now and allowed by the address policy."""
        try:
            return self._policy.addresses(node.config.host, node.config.port)[0]
        except (AddressRefusedError, OSError) as exc:
            self._refusal(peer, "dimse.move", f"move destination {node.name} not reached: "
                          f"{exc}", outcome="failure")
            return None

    def _move_tls(self, peer: Peer, node: RemoteNodeState) -> tuple[Any, str] | bool:
        """pynetdicom's tls_args for a node with TLS on; True without TLS; False (refusal
        recorded) when its TLS settings cannot be used."""
        tls = TlsClientSettings.of(node.config)
        if tls is None:
            return True
        try:
            return tls.context(), tls.server_name or node.config.host
        except TlsConfigError as exc:
            self._refusal(peer, "dimse.move", f"move destination {node.name}: TLS settings: "
                          f"{exc}", outcome="failure")
            return False

    def _move_association(self, node: RemoteNodeState, address: str, rows: list[dict[str, Any]],
                          accepted: dict[str, set[str]],
                          tls: Any = None) -> tuple[str, int, dict[str, Any]]:
        def on_accepted(event: Any) -> None:
            for cx in event.assoc.accepted_contexts:
                accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))

        kwargs = {"contexts": storage_contexts(rows), "max_pdu": 0,
                  "evt_handlers": [*CONNECTION_HANDLERS, (evt.EVT_ACCEPTED, on_accepted)]}
        if tls is not None:  # sub-operations over TLS to a node with TLS on
            kwargs["tls_args"] = tls
        return address, node.config.port, kwargs

    # -- C-GET ----------------------------------------------------------------------------

    def handle_get(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
        model = GET_MODELS.get(str(event.request.AffectedSOPClassUID), "study")
        status, rows = self._retrieve_request(event, peer, "get", model, "")
        if status is not None:
            yield 1
            yield status, None
            return
        accepted: dict[str, set[str]] = {}
        for cx in event.assoc.accepted_contexts:
            if cx.as_scu:
                accepted.setdefault(str(cx.abstract_syntax), set()).add(
                    str(cx.transfer_syntax[0]))
        yield len(rows)
        yield from self._sub_operations(event, rows, accepted, peer.ae_title)

    # -- shared ---------------------------------------------------------------------------

    def _retrieve_request(self, event: Any, peer: Peer, service: str, model: str,
                          detail: str) -> tuple[int | None, list[dict[str, Any]]]:
        """(refusal status or None, the instances to send); the access is recorded first."""
        action = f"dimse.{service}"
        if not self._allowed(peer, service):
            self._refusal(peer, action, f"calling AE not allowed to C-{service.upper()}")
            return STATUS_NOT_AUTHORISED, []
        try:
            query = parse_query(_identifier(event), model)
            require_unique_key(query)
            lag = self._view_lag(action)
            rows = run_query(self._studies(), query, MAX_RETRIEVE_INSTANCES, level="IMAGE",
                             extra=RETRIEVE_COLUMNS)
        except QueryError as exc:
            self._refusal(peer, action, str(exc), outcome="failure")
            return exc.status, []
        if not self._record(peer, action, query, f"instances={len(rows)}{detail}{lag}", rows):
            return STATUS_OUT_OF_RESOURCES, []
        return None, rows

    def _sub_operations(self, event: Any, rows: list[dict[str, Any]],
                        accepted: dict[str, set[str]], where: str) -> Iterator[Any]:
        for row in rows:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, self._dataset(row, accepted, where)

    def _dataset(self, row: dict[str, Any], accepted: dict[str, set[str]], where: str) -> Dataset:
        """The stored instance in a syntax the peer accepted, or a stand-in that pynetdicom
        fails to send (so the sub-operation counts as failed and its UID is listed)."""
        sop_class, stored = str(row["k_sopclassuid"]), str(row["transfer_syntax_uid"])
        syntaxes = accepted.get(sop_class, set())
        try:
            path = self._blobs.wait_for(str(row["sha256"]), timeout=5.0)
            if path is None:
                raise OSError("blob missing")
            if stored in syntaxes:
                return dcmread(path)
            if not syntaxes.intersection(UNCOMPRESSED):
                raise DeliveryError("no accepted presentation context")
            item = Outgoing(delivery_id="", path=path, sha256=str(row["sha256"]),
                            size=int(row["size"]), sop_class_uid=sop_class,
                            sop_instance_uid=str(row["k_sopinstanceuid"]),
                            transfer_syntax_uid=stored, load_header=Dataset)
            return decoded_for_peer(item, UID(sop_class).name or sop_class, where)[0]
        except (OSError, DeliveryError) as exc:
            logger.warning("retrieve sub-operation to %s not sent: %s", where,
                           type(exc).__name__ if isinstance(exc, OSError) else exc)
            failed = Dataset()
            failed.SOPClassUID = sop_class
            failed.SOPInstanceUID = str(row["k_sopinstanceuid"])
            return failed

    def _view_lag(self, action: str) -> str:
        """Wait for the studies view to hold every receipt acknowledged so far; what the
        access record then says about the view: nothing, or that it lagged."""
        if self._fresh is None or self._fresh.wait("studies"):
            return ""
        logger.warning("%s answered from a studies view that still lags after %.0f s",
                       action, self._fresh.timeout)
        return " view_lagged"

    def _allowed(self, peer: Peer, service: str) -> bool:
        if self._open:
            return True
        node = self._remote.node_for_ae(peer.ae_title)
        if node is None or not node.config.allows(service):
            self._remote.refresh()  # refusals are rare: make sure the refusal is current
            node = self._remote.node_for_ae(peer.ae_title)
        return node is not None and node.config.allows(service)

    def _record(self, peer: Peer, action: str, query: Query, detail: str,
                rows: list[dict[str, Any]] | None = None) -> bool:
        """Record the access before answering; False if the access log cannot be written.

        The study and patient are the ones the query names, or, for a retrieve, the one study
        and patient all its instances belong to.
        """
        study = query.single("StudyInstanceUID") or _only(rows, "k_studyinstanceuid")
        record = AccessRecord(
            action=action, object_type="study" if study else "query", object_id=study or "",
            study_instance_uid=study,
            patient_id=query.single("PatientID") or _only(rows, "k_patientid"),
            detail=f"model={query.model} level={query.level} {detail}")
        try:
            self._sessions.record(peer.actor, record)
        except Exception as exc:
            logger.error("access to the studies view not recorded: %s", type(exc).__name__)
            return False
        return True

    def _refusal(self, peer: Peer, action: str, reason: str, outcome: str = "denied") -> None:
        logger.warning("%s from %s refused: %s", action, peer.ae_title, reason)
        try:
            self._sessions.record(peer.actor, AccessRecord(
                action=action, object_type="query", outcome=outcome, detail=reason))
        except Exception as exc:
            logger.error("refusal not recorded: %s", type(exc).__name__)


def _only(rows: list[dict[str, Any]] | None, column: str) -> str | None:
    values = {row[column] for row in rows or ()}
    return str(values.pop()) if len(values) == 1 and None not in values else None


def _identifier(event: Any) -> Dataset:
    try:
        identifier = event.identifier
    except Exception:
        raise QueryError("the identifier could not be decoded") from None
    return identifier


def storage_contexts(rows: list[dict[str, Any]]) -> list[PresentationContext]:
    """Contexts to a C-MOVE destination: each SOP class in its stored syntaxes plus
    uncompressed, most frequent SOP classes first, within the protocol's limit."""
    by_class: dict[str, dict[str, int]] = {}
    for row in rows:
        syntaxes = by_class.setdefault(str(row["k_sopclassuid"]), {})
        ts = str(row["transfer_syntax_uid"])
        syntaxes[ts] = syntaxes.get(ts, 0) + 1
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in sorted(by_class.items(), key=lambda kv: -sum(kv[1].values())):
        wanted = [[ts] for ts in syntaxes if ts not in UNCOMPRESSED] + [list(UNCOMPRESSED)]
        if len(contexts) + len(wanted) > MAX_MOVE_CONTEXTS:
            break
        contexts.extend(build_context(sop_class, ts) for ts in wanted)
    return contexts


class LazyView:
    """A view's database (the studies view unless told), opened on first use: receiver
    processes rarely need it (router/wiring.py)."""

    def __init__(self, database_url: str, view: str = "studies") -> None:
        self._url = database_url
        self._view = view
        self._db: ViewDatabase | None = None

    def __call__(self) -> ViewDatabase:
        if self._db is None:
            from projections.db import open_views

            self._db = open_views(self._url, self._view)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_QUEUED_REPLIES = 4  # C-FIND responses waiting for pynetdicom's reactor before we make more
_REPLY_WAIT = 5.0  # seconds, at most, per response


def _let_replies_go(assoc: Any) -> None:
    """Wait while a few responses are still queued for sending. pynetdicom's reactor reads an
    incoming PDU (such as a C-CANCEL) only when it has nothing left to send, so a handler that
    queued every match at once never saw the cancel of a long answer. This also keeps a large
    answer's datasets from piling up in memory ahead of the socket."""
    queue = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + _REPLY_WAIT
    while queue.qsize() >= _QUEUED_REPLIES and assoc.is_established \
            and time.monotonic() < deadline:
        time.sleep(0.0005)
