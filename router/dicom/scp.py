"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class, streamed to the spool,
and query/retrieve (C-FIND, C-MOVE, C-GET) when given a QueryRetrieveSCP.

The C-STORE handler finishes the spool file, calls the Receiver once and returns its status;
no routing or network I/O happens here. Shutdown stops accepting, lets in-flight C-STOREs end.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import uid as uids
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from router.application.receive import STATUS_OUT_OF_RESOURCES, Arrival, Receiver
from router.dicom.push_scp import PushAssociation, PushPolicy, is_push, peek_request
from router.dicom.store_request import StoreRequest
from router.settings import Settings

if TYPE_CHECKING:
    from router.dicom.qr_scp import QueryRetrieveSCP

logger = logging.getLogger(__name__)

# Deflated Explicit VR Little Endian is refused on purpose: pynetdicom inflates it without bound.
TRANSFER_SYNTAXES = [
    uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.ExplicitVRBigEndian,
    uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLossless, uids.JPEGLosslessSV1,
    uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.JPEG2000Lossless, uids.JPEG2000,
    uids.RLELossless, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K,
    uids.MPEG2MPML, uids.MPEG2MPHL, uids.MPEG4HP41, uids.MPEG4HP41BD, uids.HEVCMP51,
]


class DicomServer:
    """Owns the pynetdicom AE and its listening socket.

    In a receiver process (``channel`` given) there is no listening socket: the parent accepts
    and hands each connection over ``channel``; ``on_connection_done`` is called when one is
    finished with (see :mod:`router.dicom.receivers`).
    """

    def __init__(self, settings: Settings, receiver: Receiver,
                 qr: QueryRetrieveSCP | None = None, channel: socket.socket | None = None,
                 on_connection_done: Callable[[], None] = lambda: None) -> None:
        self._settings = settings
        self._channel = channel
        self._on_connection_done = on_connection_done
        self._receiver = receiver
        self._qr = qr
        self._server: ThreadedAssociationServer | None = None
        self._busy = 0
        self._busy_lock = threading.Condition()
        self.ae = self._build_ae()
        self._pushes: set[PushAssociation] = set()  # being served by push_scp
        self._pushes_lock = threading.Lock()
        self.push_policy = self._push_policy()

    def _build_ae(self) -> AE:
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.dicom.max_associations
        ae.maximum_pdu_size = s.dicom.max_pdu_size
        ae.network_timeout = s.dicom.network_timeout
        ae.acse_timeout = s.dicom.acse_timeout
        ae.dimse_timeout = s.dicom.dimse_timeout
        if s.dicom.require_known_calling_ae:
            # pynetdicom rejects others: rejected-permanent, "calling AE title not recognised".
            ae.require_calling_aet = list(s.dicom.known_calling_aets) or ["\x00"]
        ae.add_supported_context(Verification)
        for sop_class in sorted(_STORAGE_CLASSES.values()):
            # Both roles: a C-GET requestor takes the SCP role for the storage sub-operations.
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        if self._qr is not None:
            self._qr.add_contexts(ae)
        return ae

    def _push_policy(self) -> PushPolicy:
        s = self._settings
        known = (frozenset(a.strip() for a in s.dicom.known_calling_aets)
                 if s.dicom.require_known_calling_ae else None)
        return PushPolicy(
            ae_title=s.ae_title, storage_classes=frozenset(_STORAGE_CLASSES.values()),
            transfer_syntaxes=frozenset(TRANSFER_SYNTAXES),
            verification_syntaxes=frozenset(DEFAULT_TRANSFER_SYNTAXES),
            known_calling_aets=known, max_pdu=s.dicom.max_pdu_size,
            max_incoming_pdu=s.dicom.max_incoming_pdu, acse_timeout=s.dicom.acse_timeout,
            network_timeout=s.dicom.network_timeout,
        )

    def serve_push(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Serve a storage push association here (True), or leave it to pynetdicom."""
        request = peek_request(sock, self.push_policy.acse_timeout)
        if request is None or not is_push(request, self.push_policy):
            return False
        push = PushAssociation(sock, address, request, self.push_policy, self.store)
        server = self._server
        with self._pushes_lock:
            theirs = len([a for a in server.active_associations if a.is_acceptor]) if server else 0
            over_limit = len(self._pushes) + theirs >= self.ae.maximum_associations
            if not over_limit:
                self._pushes.add(push)
        try:
            push.run(over_limit)
        finally:
            with self._pushes_lock:
                self._pushes.discard(push)
        return True

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            *(self._qr.handlers() if self._qr is not None else []),
        ]
        server_class = _Server if self._channel is None else _HandedServer
        self._server = self.ae.make_server(
            (self._settings.dicom_host, self._settings.dicom_port),
            evt_handlers=handlers, server_class=server_class,
        )
        self._server.router_scp = self  # type: ignore[attr-defined]
        if isinstance(self._server, _HandedServer):
            assert self._channel is not None
            self._server.adopt(self._channel, self._on_connection_done)
        thread = threading.Thread(target=self._server.serve_forever, name="dicom-accept",
                                  daemon=True)
        thread.start()
        self.ae._servers.append(self._server)
        logger.info("DICOM listener on %s:%d as %s", self._settings.dicom_host, self.port,
                    self._settings.ae_title)

    def stop(self, grace: float) -> None:
        """Stop accepting, wait up to ``grace`` s for associations to end, then abort the rest."""
        if self._server is None:
            return
        # pynetdicom's and push_scp's: both have is_alive() and abort().
        associations: list[Association | PushAssociation] = list(
            self._server.active_associations)
        with self._pushes_lock:
            associations += list(self._pushes)
        self._server.shutdown()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(a.is_alive() for a in associations):
            time.sleep(0.05)
        with self._busy_lock:
            # Never abort in the middle of a C-STORE: its answer must match what was saved.
            self._busy_lock.wait_for(lambda: self._busy == 0, timeout=max(grace, 5.0))
            for assoc in associations:
                if assoc.is_alive():
                    assoc.abort()
        self._server = None

    def _handle_store(self, event: Any) -> int:
        try:
            request = StoreRequest.from_event(event)
        except RuntimeError as exc:
            logger.error("%s", exc)
            return STATUS_OUT_OF_RESOURCES
        return self.store(request)

    def store(self, request: StoreRequest) -> int:
        """Take in one spooled C-STORE and answer its status (never raises)."""
        with self._busy_lock:
            self._busy += 1
        try:
            return self._store(request)
        except Exception as exc:
            # pynetdicom would answer 0xC211 and log the traceback, whose message may quote tag
            # values; a transient "out of resources" tells the sender to try again (nothing was
            # saved). Only the type and where it was raised are logged: no PHI.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            logger.error("C-STORE handler failed: %s at %s:%d; answered 0xA700",
                         type(exc).__name__, Path(where.filename).name, where.lineno or 0)
            request.spool.close()
            request.spool.path.unlink(missing_ok=True)
            return STATUS_OUT_OF_RESOURCES
        finally:
            with self._busy_lock:
                self._busy -= 1
                self._busy_lock.notify_all()

    def _store(self, request: StoreRequest) -> int:
        origin = None
        if self._qr is not None:
            try:
                # A sub-operation of a C-MOVE a user asked for?
                job = self._qr.retrieve_of(request.sender_aet, request.move_originator_aet,
                                           request.move_originator_message_id)
            except Exception as exc:
                # The lookup reads the log about once a second; when the database is away the
                # save below fails too and answers 0xA700, so just go on without the attribution.
                logger.warning("retrieve lookup failed (%s); received as a plain C-STORE",
                               type(exc).__name__)
                job = None
            if job is not None:
                origin = Origin("retrieve", job.user, job.correlation_id)
        return store_spooled(request, self._receiver, origin)


@dataclass(frozen=True)
class Origin:
    """Whom a received object is attributed to when it is not a plain C-STORE (retrieves)."""

    source: str
    actor: str
    correlation_id: str


def store_spooled(request: StoreRequest, receiver: Receiver,
                  origin: Origin | None = None) -> int:
    """Finish a C-STORE streamed to the spool and hand it to the receiver; the status."""
    spool = request.spool
    try:
        sha256 = spool.finish()
    except OSError as exc:
        spool.close()
        spool.path.unlink(missing_ok=True)
        reason = f"spool write failed: {exc.strerror or type(exc).__name__}"
        logger.error("%s", reason)
        # Recorded like every other refusal, so a full disk shows in the audit trail.
        return receiver.refuse(_arrival(request, "", origin), STATUS_OUT_OF_RESOURCES,
                               reason).status
    return receiver.receive(_arrival(request, sha256, origin)).status


def _arrival(request: StoreRequest, sha256: str, origin: Origin | None) -> Arrival:
    spool = request.spool
    return Arrival(
        wait_durable=spool.wait_durable, reader=spool.reader,
        path=spool.path, sha256=sha256, size=spool.size,
        source=origin.source if origin else "dimse",
        actor=origin.actor if origin else request.sender_aet, source_ip=request.sender_ip,
        calling_aet=request.sender_aet, called_aet=request.our_aet,
        sop_class_uid=request.sop_class_uid, sop_instance_uid=request.sop_instance_uid,
        transfer_syntax_uid=request.transfer_syntax_uid,
        correlation_id=origin.correlation_id if origin else "",
        abstract_syntax=request.abstract_syntax,
    )


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, but storage push associations are served by push_scp."""

    router_scp: DicomServer | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        scp = self.router_scp
        if scp is not None and isinstance(request, socket.socket):
            try:
                if scp.serve_push(request, client_address):
                    return
            except Exception:
                logger.exception("storage push association failed")
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _HandedServer(_Server):
    """A receiver process's server: it binds nothing. Its "listening" socket is the Unix socket
    over which the parent process hands it accepted connections (one descriptor per message,
    with the peer's address as text); ``done`` is called once each connection is finished with.
    """

    _done: Callable[[], None] = staticmethod(lambda: None)

    def server_bind(self) -> None:
        pass  # the parent process owns the port

    def server_activate(self) -> None:
        pass

    def adopt(self, channel: socket.socket, done: Callable[[], None]) -> None:
        assert self.socket is not None
        self.socket.close()  # the unbound TCP socket TCPServer made
        self.socket = channel
        self._done = done

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        message, fds, _, _ = socket.recv_fds(self.socket, 512, 1)
        if not fds:
            time.sleep(0.2)  # the parent is gone; SIGTERM follows (PDEATHSIG)
            raise OSError("connection channel closed")
        host, port = message.decode("ascii").rsplit(" ", 1)
        return socket.socket(fileno=fds[0]), (host, int(port))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
            # pynetdicom serves its associations on a thread of their own: wait for it, so
            # that the parent's count of this process's connections stays true.
            for assoc in self.active_associations:
                if getattr(assoc.dul.socket, "socket", None) is request:
                    assoc.join()
        finally:
            self._done()


def _handle_echo(event: Any) -> int:
    return 0x0000
