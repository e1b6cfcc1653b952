"""Serving storage pushes (C-STORE and C-ECHO) without pynetdicom's per-message layers.

pynetdicom turns every PDU into objects, hands each message between two threads and encodes
every command set through pydicom: about 1.5 ms of CPU per C-STORE here, more than the whole
receipt, and several copies of each byte of a large object. An association that proposes only
storage and verification contexts, with no role, extended or identity negotiation (what
modalities and PACS send), is served here instead: one thread reads the PDUs into one buffer,
dataset fragments go from that buffer to the spool file, command sets are encoded by hand.

Everything else is handed to pynetdicom unchanged: the decision is made on the A-ASSOCIATE-RQ
read with MSG_PEEK, so pynetdicom still reads the request itself. That includes every
association pynetdicom would reject for its calling AE title, so rejections are its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.dicom import pdus
from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.peer import Peer
from router.dicom.protocol_log import PROTOCOL_LOG
from router.dicom.spool import SpoolFile
from router.dicom.store_request import StoreRequest
from router.dicom.tuning import FileMeta, encode_file_meta, spool_dir

logger = logging.getLogger(__name__)

PEEK_LIMIT = 64 * 1024  # a larger A-ASSOCIATE-RQ goes to pynetdicom
_USER_ITEMS_SERVED = frozenset((0x51, 0x52, 0x53, 0x55))  # max length, implementation, async
STATUS_OUT_OF_RESOURCES = 0xA700
MAX_COMMAND_SET = 64 * 1024  # a C-STORE-RQ is a few hundred bytes; endless fragments are not


@dataclass(frozen=True)
class PushPolicy:
    """What the listener accepts (from the settings, as pynetdicom's AE is configured)."""

    ae_title: str
    storage_classes: frozenset[str]
    transfer_syntaxes: frozenset[str]
    verification_syntaxes: frozenset[str]
    known_calling_aets: frozenset[str] | None  # None: any calling AE
    max_pdu: int  # advertised; 0 = unlimited
    max_incoming_pdu: int  # hard cap on what a peer may send anyway
    acse_timeout: float
    network_timeout: float


def peek_request(sock: socket.socket, timeout: float) -> pdus.AssociateRequest | None:
    """The A-ASSOCIATE-RQ waiting on ``sock``, read without consuming it; None when there is
    none to read this way (another PDU, too large, malformed, too slow, closed)."""
    deadline = time.monotonic() + timeout
    wanted = 6
    try:
        sock.settimeout(timeout)
        while True:
            data = sock.recv(wanted, socket.MSG_PEEK)
            if not data:
                return None
            if len(data) >= 6:
                kind, _, length = struct.unpack_from(">BBL", data)
                if kind != pdus.A_ASSOCIATE_RQ or length > PEEK_LIMIT:
                    return None
                wanted = 6 + length
                if len(data) >= wanted:
                    return pdus.parse_associate_rq(data[6:wanted])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)  # the rest of the request is on its way
    except (OSError, pdus.PduError):
        return None


def is_push(request: pdus.AssociateRequest, policy: PushPolicy) -> bool:
    """Whether this module serves the association (else pynetdicom does)."""
    if request.application_context != pdus.APPLICATION_CONTEXT or not request.contexts:
        return False
    if not request.user_items <= _USER_ITEMS_SERVED:
        return False
    if policy.known_calling_aets is not None and (
            request.calling_aet not in policy.known_calling_aets):
        return False  # pynetdicom rejects it, with its reason
    return all(c.abstract_syntax in policy.storage_classes
               or c.abstract_syntax == pdus.VERIFICATION for c in request.contexts)


class _Closed(Exception):
    """The peer closed the connection or aborted."""


@dataclass
class _Pending:
    """A C-STORE whose dataset is arriving."""

    command: pdus.Command
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    spool: SpoolFile | None  # None: the spool file could not be created


class PushAssociation:
    """One storage push association, served on the thread that accepted it."""

    def __init__(self, sock: socket.socket, peer: Peer,
                 request: pdus.AssociateRequest, policy: PushPolicy,
                 store: Callable[[StoreRequest], int]) -> None:
        self._sock = sock
        self._peer = peer
        self._request = request
        self._policy = policy
        self._store = store
        self._accepted: dict[int, tuple[str, str]] = {}  # context id -> (abstract, syntax)
        self._peer_max_pdu = request.max_pdu
        self._command = bytearray()
        self._pending: _Pending | None = None
        self._buffer = bytearray(1 << 16)
        self._done = threading.Event()
        self._timeout: float | None = None

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def abort(self) -> None:
        """Stop at once (shutdown): A-ABORT to the peer; the reading thread ends."""
        with contextlib.suppress(OSError):
            self._sock.sendall(pdus.encode_abort())
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def run(self, over_limit: bool) -> None:
        """Serve until release or abort; ``over_limit``: reject (too many associations)."""
        try:
            with contextlib.suppress(OSError):  # a TLS tunnel's local socket has no Nagle
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocking from here, with the timeouts in the kernel (set by _read_pdu).
            self._read_pdu(self._policy.acse_timeout)  # the request we peeked at
            if over_limit:
                # Rejected transient, by the presentation service provider, local limit
                # exceeded: as pynetdicom does.
                self._sock.sendall(pdus.encode_associate_rj(2, 3, 2))
                return
            self._sock.sendall(self._accept())
            while True:
                kind, body = self._read_pdu(self._policy.network_timeout)
                if kind == pdus.P_DATA_TF:
                    self._on_pdata(body)
                elif kind == pdus.A_RELEASE_RQ:
                    self._sock.sendall(pdus.encode_release_rp())
                    return
                elif kind == pdus.A_ABORT:
                    return
                else:
                    raise pdus.PduError(f"unexpected PDU type 0x{kind:02X}")
        except _Closed:
            pass
        except TimeoutError:
            PROTOCOL_LOG.warning(self._peer.host, "association from %s idle past the network "
                                 "timeout; aborted", self._request.calling_aet)
            with contextlib.suppress(OSError):
                self._sock.sendall(pdus.encode_abort())
        except pdus.PduError as exc:
            PROTOCOL_LOG.warning(self._peer.host, "association from %s aborted: %s",
                                 self._request.calling_aet, exc)
            with contextlib.suppress(OSError):
                self._sock.sendall(pdus.encode_abort(2, 2))  # unrecognised/unexpected PDU
        except OSError as exc:
            logger.info("association from %s ended: %s", self._request.calling_aet,
                        exc.strerror or type(exc).__name__)
        finally:
            self._discard_pending()
            with contextlib.suppress(OSError):
                self._sock.close()
            self._done.set()

    # -- association ------------------------------------------------------------------------

    def _accept(self) -> bytes:
        policy, results = self._policy, []
        for context in self._request.contexts:
            is_echo = context.abstract_syntax == pdus.VERIFICATION
            supported = policy.verification_syntaxes if is_echo else policy.transfer_syntaxes
            # The first of the requestor's transfer syntaxes that we support (as pynetdicom).
            chosen = next((ts for ts in context.transfer_syntaxes if ts in supported), None)
            if chosen is None:
                syntax = context.transfer_syntaxes[0] if context.transfer_syntaxes else ""
                results.append((context.context_id, pdus.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                syntax))
            else:
                self._accepted[context.context_id] = (context.abstract_syntax, chosen)
                results.append((context.context_id, pdus.ACCEPTED, chosen))
        return pdus.encode_associate_ac(self._request, results, policy.max_pdu,
                                        IMPLEMENTATION_UID,
                                        IMPLEMENTATION_VERSION)

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            pdus.set_kernel_timeouts(self._sock, seconds)
            self._timeout = seconds

    def _read_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                count = self._sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise TimeoutError from None
            if not count:
                raise _Closed
            got += count

    def _read_pdu(self, timeout: float) -> tuple[int, memoryview]:
        self._set_timeout(timeout)
        header = bytearray(6)
        self._read_exactly(memoryview(header))
        kind, _, length = struct.unpack(">BBL", header)
        if length > self._policy.max_incoming_pdu:
            raise pdus.PduError(f"PDU of {length} bytes exceeds the "
                                f"{self._policy.max_incoming_pdu} limit")
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._read_exactly(body)
        return kind, body

    # -- DIMSE ------------------------------------------------------------------------------

    def _on_pdata(self, body: memoryview) -> None:
        for context_id, control, fragment in pdus.iter_pdvs(body):
            if context_id not in self._accepted:
                raise pdus.PduError(f"PDV on presentation context {context_id}, not accepted")
            if control & 1:
                self._command += fragment
                if len(self._command) > MAX_COMMAND_SET:
                    raise pdus.PduError("command set larger than any C-STORE or C-ECHO needs")
                if control & 2:
                    command = pdus.decode_command(bytes(self._command))
                    self._command.clear()
                    self._on_command(context_id, command)
            elif self._pending is None:
                raise pdus.PduError("dataset fragment without a C-STORE request")
            else:
                if self._pending.spool is not None:
                    self._pending.spool.write(fragment)
                if control & 2:
                    self._on_stored()

    def _on_command(self, context_id: int, command: pdus.Command) -> None:
        if self._pending is not None:
            raise pdus.PduError("a command arrived inside a C-STORE's dataset")
        abstract, syntax = self._accepted[context_id]
        if command.command_field == pdus.C_ECHO_RQ:
            self._respond(context_id, pdus.encode_response(
                pdus.C_ECHO_RSP, command.sop_class_uid or pdus.VERIFICATION, command.message_id,
                0x0000))
        elif command.command_field == pdus.C_STORE_RQ:
            if command.dataset_type == pdus.NO_DATASET or abstract == pdus.VERIFICATION:
                raise pdus.PduError("C-STORE request without a dataset or on a Verification "
                                    "context")
            self._pending = _Pending(command, context_id, abstract, syntax,
                                     self._open_spool(command, syntax))
        elif command.command_field != pdus.C_CANCEL_RQ:  # nothing to cancel: ignored
            raise pdus.PduError(f"command 0x{command.command_field:04X} on a storage "
                                "association")

    def _open_spool(self, command: pdus.Command, syntax: str) -> SpoolFile | None:
        """The spool file with preamble and meta, as pynetdicom writes it; None on failure."""
        try:
            spool = SpoolFile(spool_dir())
        except OSError as exc:
            logger.error("spool file could not be created: %s",
                         exc.strerror or type(exc).__name__)
            return None
        spool.write(b"\0" * 128 + b"DICM")
        spool.write(encode_file_meta(FileMeta(
            command.sop_class_uid, command.sop_instance_uid, syntax,
            IMPLEMENTATION_UID, IMPLEMENTATION_VERSION)))
        return spool

    def _on_stored(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        command, spool = pending.command, pending.spool
        if spool is None:
            status = STATUS_OUT_OF_RESOURCES
        else:
            try:
                status = self._store(StoreRequest(
                    spool=spool, sop_class_uid=command.sop_class_uid,
                    sop_instance_uid=command.sop_instance_uid,
                    transfer_syntax_uid=pending.transfer_syntax,
                    sender_aet=self._request.calling_aet, our_aet=self._policy.ae_title,
                    sender_ip=self._peer.host, move_originator_aet=command.move_originator_aet,
                    move_originator_message_id=command.move_originator_message_id,
                    abstract_syntax=pending.abstract_syntax, tls_subject=self._peer.tls_subject,
                ))
            finally:
                # As pynetdicom does after its handler: the receipt moved the file away or
                # refused it; whatever is left under the spool name goes.
                spool.close()
                spool.path.unlink(missing_ok=True)
        self._respond(pending.context_id, pdus.encode_response(
            pdus.C_STORE_RSP, command.sop_class_uid, command.message_id, status,
            command.sop_instance_uid))

    def _respond(self, context_id: int, command_set: bytes) -> None:
        self._sock.sendall(pdus.encode_pdata(context_id, True, command_set, self._peer_max_pdu))

    def _discard_pending(self) -> None:
        """An association that ends inside a C-STORE leaves no spool file behind."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.spool is not None:
            pending.spool.close()
            pending.spool.path.unlink(missing_ok=True)
