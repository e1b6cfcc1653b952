"""The DICOM server: C-ECHO and C-STORE for every storage SOP class, streamed to the spool,
query/retrieve (C-FIND, C-MOVE, C-GET) when given a QueryRetrieveSCP, and Storage Commitment
(N-ACTION) when given a CommitmentService.

It serves connections the front door (:mod:`router.dicom.gate`) hands it over a local socket:
its own gate when this process owns the DICOM ports, the parent's when it is a receiver
process. The C-STORE handler finishes the spool file, calls the Receiver once and returns its
status; no routing or network I/O happens here. Shutdown stops accepting, lets in-flight
C-STOREs end.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import uid as uids
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from router.application.receive import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    Arrival,
    Receiver,
)
from router.dicom.gate import Gate
from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.peer import Peer
from router.dicom.push_scp import PushAssociation, PushPolicy, is_push, peek_request
from router.dicom.store_request import StoreRequest
from router.dicom.tls import listener_context
from router.settings import Settings

if TYPE_CHECKING:
    from router.dicom.commitment_scp import CommitmentService
    from router.dicom.qr_scp import QueryRetrieveSCP

logger = logging.getLogger(__name__)

SERVE_POLL = 0.05  # seconds between the server loop's checks for a shutdown

# Deflated Explicit VR Little Endian is refused on purpose: pynetdicom inflates it without bound.
TRANSFER_SYNTAXES = [
    uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.ExplicitVRBigEndian,
    uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLossless, uids.JPEGLosslessSV1,
    uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.JPEG2000Lossless, uids.JPEG2000,
    uids.RLELossless, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K,
    uids.MPEG2MPML, uids.MPEG2MPHL, uids.MPEG4HP41, uids.MPEG4HP41BD, uids.HEVCMP51,
]

# Every storage SOP class pynetdicom knows (its "all storage" contexts, one per class), sorted.
STORAGE_CLASSES: tuple[str, ...] = tuple(sorted(
    {str(context.abstract_syntax) for context in AllStoragePresentationContexts}))


def add_storage_contexts(ae: AE) -> None:
    """Verification and every storage SOP class, as the DICOM port accepts them (the
    conformance statement's tables are generated from these, router/dicom/conformance.py)."""
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        # Both roles: a C-GET requestor takes the SCP role for the storage sub-operations.
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)


class DicomServer:
    """Owns the pynetdicom AE and serves the connections handed to it.

    In a receiver process (``channel`` given) the parent's gate hands each connection over
    ``channel``; ``on_connection_done(conn_id)`` is called when one is finished with (see
    :mod:`router.dicom.receivers`). Otherwise :meth:`start` opens the DICOM ports with a gate
    of its own.
    """

    def __init__(self, settings: Settings, receiver: Receiver,
                 qr: QueryRetrieveSCP | None = None, channel: socket.socket | None = None,
                 on_connection_done: Callable[[int], None] = lambda conn_id: None,
                 commitment: CommitmentService | None = None) -> None:
        self._settings = settings
        self._channel = channel
        self._on_connection_done = on_connection_done
        self._receiver = receiver
        self._qr = qr
        self.commitment = commitment
        self._server: _HandedServer | None = None
        self.gate: Gate | None = None
        self._busy = 0
        self._busy_lock = threading.Condition()
        self.ae = self._build_ae()
        self._pushes: set[PushAssociation] = set()  # being served by push_scp
        self._pushes_lock = threading.Lock()
        self.push_policy = self._push_policy()

    def _build_ae(self) -> AE:
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_UID  # ours, not pynetdicom's (identity.py)
        ae.implementation_version_name = IMPLEMENTATION_VERSION
        ae.maximum_associations = s.dicom.max_associations
        ae.maximum_pdu_size = s.dicom.max_pdu_size
        ae.network_timeout = s.dicom.network_timeout
        ae.acse_timeout = s.dicom.acse_timeout
        ae.dimse_timeout = s.dicom.dimse_timeout
        # The gate refuses these before handing a connection over; pynetdicom's own checks
        # stay as a second line.
        if s.dicom.require_known_calling_ae:
            ae.require_calling_aet = list(s.dicom.known_calling_aets) or ["\x00"]
        ae.require_called_aet = s.dicom.require_called_aet
        add_storage_contexts(ae)
        if self._qr is not None:
            self._qr.add_contexts(ae)
        if self.commitment is not None:
            self.commitment.add_contexts(ae)
        return ae

    def _push_policy(self) -> PushPolicy:
        s = self._settings
        known = (frozenset(a.strip() for a in s.dicom.known_calling_aets)
                 if s.dicom.require_known_calling_ae else None)
        return PushPolicy(
            ae_title=s.ae_title, storage_classes=frozenset(STORAGE_CLASSES),
            transfer_syntaxes=frozenset(TRANSFER_SYNTAXES),
            verification_syntaxes=frozenset(DEFAULT_TRANSFER_SYNTAXES),
            known_calling_aets=known, max_pdu=s.dicom.max_pdu_size,
            max_incoming_pdu=s.dicom.max_incoming_pdu, acse_timeout=s.dicom.acse_timeout,
            network_timeout=s.dicom.network_timeout,
        )

    def serve_push(self, sock: socket.socket, peer: Peer) -> bool:
        """Serve a storage push association here (True), or leave it to pynetdicom."""
        request = peek_request(sock, self.push_policy.acse_timeout)
        if request is None or not is_push(request, self.push_policy):
            return False
        push = PushAssociation(sock, peer, request, self.push_policy, self.store)
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
        """The plain DICOM port (0 when there is none, or in a receiver process)."""
        return self.gate.port if self.gate is not None else 0

    @property
    def tls_port(self) -> int:
        return self.gate.tls_port if self.gate is not None else 0

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            *(self._qr.handlers() if self._qr is not None else []),
            *(self.commitment.handlers() if self.commitment is not None else []),
        ]
        if self._channel is None:
            self._channel = self._open_gate()
        server = self.ae.make_server(
            (self._settings.dicom_host, 0), evt_handlers=handlers, server_class=_HandedServer)
        assert isinstance(server, _HandedServer)
        server.adopt(self, self._channel, self._on_connection_done)
        self._server = server
        # socketserver's loop notices a shutdown at its next poll: 0.5 s by default, which
        # every stop waited for. A handed-over connection wakes it at once either way.
        thread = threading.Thread(target=self._server.serve_forever, name="dicom-serve",
                                  kwargs={"poll_interval": SERVE_POLL}, daemon=True)
        thread.start()
        if self.gate is not None:
            self.gate.start()
            logger.info("DICOM listener on %s port %s%s as %s", self._settings.dicom_host,
                        self.port or "-",
                        f", TLS port {self.tls_port}" if self.tls_port else "",
                        self._settings.ae_title)

    def _open_gate(self) -> socket.socket:
        """This process owns the ports: a gate in front, handing connections to our server
        over a local socket pair, as the parent hands them to receiver processes."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # a server that stopped reading: the gate refuses, not waits
        tls = self._settings.dicom.tls
        self.gate = Gate(self._settings.dicom_host, self._settings.dicom_port,
                         self._settings.dicom, self._settings.ae_title,
                         sink=lambda conn, peer: hand_connection(ours, conn, peer),
                         tls_context=listener_context(tls) if tls is not None else None)
        self._gate_channel = ours
        self._on_connection_done = self.gate.release
        return theirs

    def stop(self, grace: float) -> None:
        """Stop accepting, wait up to ``grace`` s for associations to end, then abort the rest."""
        if self.gate is not None:
            self.gate.close_listeners()
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
        if self.gate is not None:
            self.gate.stop()
            self._gate_channel.close()

    def _handle_store(self, event: Any) -> int:
        try:
            request = StoreRequest.from_event(event)
        except RuntimeError as exc:
            logger.error("%s", exc)
            return STATUS_OUT_OF_RESOURCES
        peer = self._server.peer_of(event.assoc) if self._server is not None else None
        if peer is not None and peer.tls_subject:
            request = replace(request, tls_subject=peer.tls_subject)
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
            # A dataset that exhausts the stack or memory is the dataset's fault: 0xC000, or
            # its sender would retry it forever.
            status = (STATUS_CANNOT_UNDERSTAND if isinstance(exc, RecursionError | MemoryError)
                      else STATUS_OUT_OF_RESOURCES)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            logger.error("C-STORE handler failed: %s at %s:%d; answered 0x%04X",
                         type(exc).__name__, Path(where.filename).name, where.lineno or 0,
                         status)
            request.spool.close()
            request.spool.path.unlink(missing_ok=True)
            return status
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
    return receiver.receive(_arrival(request, sha256, origin)).dimse_status


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
        abstract_syntax=request.abstract_syntax, tls_subject=request.tls_subject,
    )


def hand_connection(channel: socket.socket, conn: socket.socket, peer: Peer) -> bool:
    """Pass an accepted connection and who sent it over ``channel`` (the descriptor is
    duplicated into the receiving end); False when the other end cannot take it now."""
    try:
        socket.send_fds(channel, [peer.encode()], [conn.fileno()])
    except OSError:
        return False
    return True


class _HandedServer(ThreadedAssociationServer):
    """pynetdicom's server, bound to nothing: its "listening" socket is the local socket over
    which a gate hands it accepted connections (one descriptor per message, with the peer as
    text). Storage push associations are served by push_scp, the rest by pynetdicom;
    ``done(conn_id)`` is called once each connection is finished with.
    """

    def server_bind(self) -> None:
        pass  # the gate owns the ports

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        """Stop serving and close the channel, as pynetdicom's shutdown does, but without
        taking this server out of its AE's list of servers: AE.start_server puts the servers
        it starts there, a server from AE.make_server (this one) is not in it."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def adopt(self, scp: DicomServer, channel: socket.socket,
              done: Callable[[int], None]) -> None:
        assert self.socket is not None
        self.socket.close()  # the unbound TCP socket TCPServer made
        self.socket = channel
        self._scp = scp
        self._done = done
        self._peers: dict[int, Peer] = {}  # socket id -> who is on it
        self._peers_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        message, fds, _, _ = socket.recv_fds(self.socket, 4096, 1)
        if not fds:
            time.sleep(0.2)  # the gate or the parent is gone; a stop follows
            raise OSError("connection channel closed")
        conn = socket.socket(fileno=fds[0])
        try:
            peer = Peer.decode(message)
        except ValueError:
            conn.close()
            raise OSError("malformed hand-over message") from None
        with self._peers_lock:
            self._peers[id(conn)] = peer
        return conn, peer.address

    def peer_of(self, assoc: Any) -> Peer | None:
        """Who is on the other end of a pynetdicom association served here."""
        sock = getattr(getattr(assoc, "dul", None), "socket", None)
        with self._peers_lock:
            return self._peers.get(id(getattr(sock, "socket", None)))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._peers_lock:
            peer = self._peers.get(id(request))
        try:
            if peer is not None and self._serve_push(request, peer):
                return
            super().process_request_thread(request, client_address)
            # pynetdicom serves its associations on a thread of their own: wait for it, so
            # that the gate's count of this connection stays true.
            for assoc in self.active_associations:
                if getattr(assoc.dul.socket, "socket", None) is request:
                    assoc.join()
        finally:
            with self._peers_lock:
                self._peers.pop(id(request), None)
            if peer is not None:
                self._done(peer.conn_id)

    def _serve_push(self, request: socket.socket, peer: Peer) -> bool:
        try:
            return self._scp.serve_push(request, peer)
        except Exception:
            logger.exception("storage push association failed")
            self.shutdown_request(request)
            return True


def _handle_echo(event: Any) -> int:
    return 0x0000
