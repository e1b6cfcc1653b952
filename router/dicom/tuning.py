"""How we run pynetdicom 3.0.4: PHI logging off, streamed receive into our spool, capped PDUs,
TCP_NODELAY on every socket, a socket read that does not copy 4 KB at a time, and reactors
that wait for what they poll for.

These are process-wide settings of the library, applied once by :func:`configure_pynetdicom`.
What pynetdicom offers for them is used first: its ``_config`` settings, and event handlers
(``CONNECTION_HANDLERS``, TCP_NODELAY on the associations we open; the gate sets it on those
we accept). The rest has no public route in pynetdicom 3.0.4 and is kept here, and only here,
as the smallest replacements that do it (issue 17, point 5): each is listed in
:data:`PATCHED_SOURCES` with the digest of the pynetdicom source it was written against, and
tests/unit/test_tuning.py fails when pynetdicom changes under any of them. No library source
is recompiled: the two reactors are our own copies of pynetdicom's loops, used only while its
source is the one they were copied from.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import queue
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pynetdicom import (
    _config,
    association,
    dimse,
    dimse_messages,
    dul,
    evt,
    transport,
)
from pynetdicom.pdu import A_ABORT_RQ

from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.protocol_log import quiet_library_errors
from router.dicom.spool import SpoolFile

logger = logging.getLogger(__name__)
_ASSOCIATION_LOG = logging.getLogger("pynetdicom.association")
_DUL_LOG = logging.getLogger("pynetdicom.dul")

_lock = threading.Lock()
_state: dict[str, Any] = {"spool_dir": None, "max_pdu": 64 * 1024 * 1024, "idle_delay": 0.001,
                          "applied": False}


class PduTooLargeError(OSError):
    """A peer announced a PDU larger than we accept; the association is dropped."""


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket (tests may use socketpairs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def spool_dir() -> Path:
    """Where received datasets are spooled (set by configure_pynetdicom)."""
    folder = _state["spool_dir"]
    if folder is None:
        raise RuntimeError("configure_pynetdicom() was not called")
    return Path(folder)


# The spool files pynetdicom is writing or has handed to an EVT_C_STORE handler, by path (the
# handler finds its own from the public event.dataset_path). Weak: pynetdicom's message holds
# the file until the handler has run; one of a transfer that was aborted goes with it.
_spools: weakref.WeakValueDictionary[str, SpoolFile] = weakref.WeakValueDictionary()


def _spool_file(*_: Any, **kwargs: Any) -> SpoolFile:
    """Stands in for NamedTemporaryFile inside pynetdicom's chunked C-STORE receive."""
    spool = SpoolFile(spool_dir())
    _spools[spool.name] = spool
    return spool


def received_spool(event: Any) -> SpoolFile | None:
    """The spool file of an EVT_C_STORE event's dataset (None if it was not streamed to one)."""
    try:
        path = event.dataset_path  # AttributeError: not a chunked C-STORE receive
    except AttributeError:
        return None
    return _spools.get(str(path))


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str


def _file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
               implementation_uid: str = IMPLEMENTATION_UID,
               implementation_version: str = IMPLEMENTATION_VERSION) -> FileMeta:
    """Stands in for pynetdicom's create_file_meta in its chunked C-STORE receive."""
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax),
                     str(implementation_uid), str(implementation_version))


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(meta: FileMeta) -> bytes:
    """Group 0002 as pydicom's write_file_meta_info writes it (Explicit VR Little Endian,
    UIDs padded with NUL, the version name with a space), about 20x faster: pynetdicom spent
    more time building and writing this header than decoding the C-STORE request."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _padded(meta.sop_class_uid, b"\0")),
        _element(0x0003, b"UI", _padded(meta.sop_instance_uid, b"\0")),
        _element(0x0010, b"UI", _padded(meta.transfer_syntax, b"\0")),
        _element(0x0012, b"UI", _padded(meta.implementation_uid, b"\0")),
        _element(0x0013, b"SH", _padded(meta.implementation_version, b" ")),
    ))
    return _element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _write_file_meta(fp: Any, meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for pydicom's write_file_meta_info in pynetdicom's chunked C-STORE receive."""
    if isinstance(meta, FileMeta):
        fp.write(encode_file_meta(meta))
    else:  # not ours (another caller): pydicom's own writer
        write_file_meta_info(fp, meta, enforce_standard)


def _recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (or fewer if the peer closes), refusing oversized PDUs."""
    if nr_bytes > _state["max_pdu"]:
        raise PduTooLargeError(f"PDU of {nr_bytes} bytes exceeds the {_state['max_pdu']} limit")
    sock = self.socket
    assert sock is not None
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        count = sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, 1 << 20))
        if not count:
            del view
            return buffer[:nr_read]
        nr_read += count
    del view
    return buffer


def _wait_for_message(assoc: Any, timeout: float = 0.005) -> None:
    """Acceptors: block until the DIMSE layer has a message (or ``timeout``), not sleep 1 ms.

    Only for acceptors, whose reactor is the queue's sole reader. On a requestor another
    thread (send_c_store) waits on the same queue and Queue.put wakes only one waiter: the
    reactor could take the wake-up and leave the sender waiting until its DIMSE timeout.
    """
    if not assoc.is_acceptor:
        time.sleep(0.001)  # requestors (our C-MOVE/C-GET/C-FIND SCU): as pynetdicom does
        return
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize():
            messages.not_empty.wait(timeout)


class _WakingQueue(queue.Queue):
    """The DUL's outgoing queue: putting a PDU also wakes the DUL reactor from its select.

    Without it a C-STORE response waited out the reactor's idle delay before it was sent
    (about half of it on average, per message, on every association).
    """

    wake: socket.socket | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        wake = self.wake
        if wake is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
                wake.send(b"\0")


def _wait_for_socket(dul_provider: Any, wake: socket.socket | None) -> None:
    """Sleep the DUL's idle delay, but wake as soon as the peer sends something or our side
    queues a PDU to send (``wake``: the reading end of the reactor's wake-up pair)."""
    sock = getattr(dul_provider.socket, "socket", None)
    delay = _state["idle_delay"]
    if sock is None:
        time.sleep(delay)
        return
    try:
        readable, _, _ = select.select([sock, wake] if wake else [sock], [], [], delay)
    except (OSError, ValueError):
        time.sleep(delay)
        return
    if wake is not None and wake in readable:
        with contextlib.suppress(OSError):
            wake.recv(4096)


def _wake_pair(outgoing: Any) -> tuple[socket.socket, socket.socket] | None:
    """A DUL reactor's wake-up pair: ``outgoing`` (its send queue) writes to the second end
    when a PDU is queued, the reactor waits on the first. None: poll as pynetdicom does."""
    if not isinstance(outgoing, _WakingQueue):
        return None
    try:
        pair = socket.socketpair()
    except OSError:  # out of descriptors
        return None
    for end in pair:
        end.setblocking(False)
    outgoing.wake = pair[1]
    return pair


def _close_wake(outgoing: Any, pair: tuple[socket.socket, socket.socket] | None) -> None:
    if pair is not None:
        outgoing.wake = None
        for end in pair:
            end.close()


def _association_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor``, line for line, except that its
    ``time.sleep(0.001)`` before each check is :func:`_wait_for_message`: an acceptor waits
    for the message it polls for. (Our copy, not its source recompiled: see
    :data:`PATCHED_SOURCES` for how a pynetdicom that differs is detected.)"""
    self._is_paused = False
    while not self._kill:
        _wait_for_message(self)

        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOCIATION_LOG.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOCIATION_LOG.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _ASSOCIATION_LOG.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


PAUSE_TIMEOUT = 5.0  # for the reactor to stand still before another thread sends


def pause_reactor(assoc: Any) -> bool:
    """Stop ``assoc``'s reactor loop (:func:`_association_reactor`, its pause protocol: the
    ``_reactor_checkpoint`` event and ``_is_paused`` flag) before sending on the association
    from another thread; False, with the reactor running again, when it is not established or
    does not stop within :data:`PAUSE_TIMEOUT`. pynetdicom's own send_* pauses it the same way
    but waits without a bound: an association released meanwhile would hold the thread for
    ever. Call :func:`resume_reactor` after sending."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + PAUSE_TIMEOUT
    while not assoc._is_paused:
        if not assoc.is_established or time.monotonic() > deadline:
            resume_reactor(assoc)
            return False
        time.sleep(0.001)
    return True


def resume_reactor(assoc: Any) -> None:
    """Let ``assoc``'s reactor loop run again (after :func:`pause_reactor`)."""
    assoc._reactor_checkpoint.set()


def _dul_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``, line for line, except that its
    idle sleep (``_run_loop_delay``, 1 ms) is :func:`_wait_for_socket` (woken by the peer's
    data or by a PDU queued to send, through a wake-up pair the loop closes when it ends)."""
    outgoing = self.to_provider_queue
    pair = _wake_pair(outgoing)
    wake = pair[0] if pair is not None else None
    try:
        self._idle_timer.start()
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                _wait_for_socket(self, wake)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _DUL_LOG.error("Exception in DUL.run(), aborting association")
                _DUL_LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False
    finally:
        _close_wake(outgoing, pair)


SEND_QUEUE_PDUS = 8
# The DUL reactor's select timeout. Arriving data and PDUs queued to send wake it at once, so
# this only paces the checks for a stop request and the ARTIM timer: short enough that ending an
# association is quick, long enough that an idle association costs no CPU (pynetdicom's 1 ms
# polling cost about a third of a receiver's CPU time per small C-STORE).
DUL_IDLE_DELAY = 0.005
MAX_SEND_PDU = 4 * 1024 * 1024
_peer_max_pdu = dimse.DIMSEServiceProvider.maximum_pdu_size
_dul_init = dul.DULServiceProvider.__init__


def _capped_peer_max_pdu(self: dimse.DIMSEServiceProvider) -> int:
    """The PDU size we send with: the peer's maximum, but never unlimited or above 4 MiB
    (pynetdicom would send a 1 GB instance to an "unlimited" peer as one 1 GB PDU)."""
    peer = int(_peer_max_pdu.fget(self))  # type: ignore[attr-defined]
    return MAX_SEND_PDU if peer == 0 or peer > MAX_SEND_PDU else peer


def _init_dul(self: dul.DULServiceProvider, *args: Any, **kwargs: Any) -> None:
    _dul_init(self, *args, **kwargs)
    # Bounded: a chunked send from a file otherwise queues every fragment of the file
    # (1 GB in memory for a 1 GB instance) faster than the socket drains them. Putting a PDU
    # also wakes the reactor (_WakingQueue).
    self.to_provider_queue = _WakingQueue(maxsize=SEND_QUEUE_PDUS)


def _nodelay_on_connect(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the socket of an association we open (the gate
    sets it on every connection it accepts)."""
    _set_nodelay(getattr(event.assoc.dul.socket, "socket", None))


# Bind these (``evt_handlers``) on every association we request through pynetdicom.
CONNECTION_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay_on_connect)]

# What this module replaces in pynetdicom (no public setting does what these do), with the
# sha256 of the source each replacement was written against: pynetdicom 3.0.4 as pinned.
# The reactors are our copies of pynetdicom's loops, applied only while the source is unchanged
# (otherwise pynetdicom's own loops run, with a warning); tests/unit/test_tuning.py fails on
# any difference, so an upgrade of pynetdicom is checked against each of them.
PYNETDICOM_VERSION = "3.0.4"
PATCHED_SOURCES: dict[str, str] = {
    # Streamed C-STORE receive into our spool (its NamedTemporaryFile), with our file meta
    # writer (its create_file_meta and write_file_meta_info): the globals it calls.
    "dimse_messages.DIMSEMessage.decode_msg":
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    # The incoming PDU cap, read without copying 4 KB at a time.
    "transport.AssociationSocket.recv":
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    # The bounded send queue that wakes the DUL reactor.
    "dul.DULServiceProvider.__init__":
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    # The reactors: wait for what they poll for.
    "association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "dul.DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    # The outgoing PDU cap.
    "dimse.DIMSEServiceProvider.maximum_pdu_size":
        "600fc7073d35ccd6c99ef1959551f308544b4fc0156fa6afde7fa536318622bf",
}
_MODULES = {"association": association, "dimse": dimse, "dimse_messages": dimse_messages,
            "dul": dul, "transport": transport}


def _library_function(name: str) -> Any:
    module, _, path = name.partition(".")
    target: Any = _MODULES[module]
    for part in path.split("."):
        target = inspect.getattr_static(target, part)
    return target.fget if isinstance(target, property) else target


# As pynetdicom defines them (this module replaces some of them in configure_pynetdicom).
_ORIGINALS: dict[str, Any] = {name: _library_function(name) for name in PATCHED_SOURCES}


def source_digest(name: str) -> str:
    """sha256 of pynetdicom's own source of a PATCHED_SOURCES entry."""
    return hashlib.sha256(inspect.getsource(_ORIGINALS[name]).encode()).hexdigest()


def _unchanged(name: str) -> bool:
    if source_digest(name) == PATCHED_SOURCES[name]:
        return True
    logger.warning("pynetdicom %s changed; its tuning is not applied", name)
    return False


def configure_pynetdicom(spool_dir: Path, max_incoming_pdu: int, idle_delay: float) -> None:
    """Apply our settings to the pynetdicom library (idempotent; latest values win)."""
    with _lock:
        spool_dir.mkdir(parents=True, exist_ok=True)
        _state["spool_dir"] = spool_dir
        _state["max_pdu"] = max_incoming_pdu
        _state["idle_delay"] = idle_delay  # the DUL reactor's idle wait (_wait_for_socket)
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        # Its standard handlers format every PDU and message for log lines our logging
        # configuration drops (the pynetdicom logger is at WARNING): pure cost.
        _config.LOG_HANDLER_LEVEL = "none"
        quiet_library_errors()  # a peer's bad PDU: one line, no traceback, rate-limited
        if _state["applied"]:
            return
        # Safety (streamed receive, PDU caps, bounded send queue): always applied.
        dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[assignment]
        dimse_messages.create_file_meta = _file_meta  # type: ignore[assignment]
        dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[assignment]
        transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        dul.DULServiceProvider.__init__ = _init_dul  # type: ignore[method-assign]
        dimse.DIMSEServiceProvider.maximum_pdu_size = property(  # type: ignore[method-assign,assignment]
            _capped_peer_max_pdu)
        # Speed: our copies of the reactors, only over the source they were copied from.
        if _unchanged("association.Association._run_reactor"):
            association.Association._run_reactor = _association_reactor  # type: ignore[method-assign]
        if _unchanged("dul.DULServiceProvider.run_reactor"):
            dul.DULServiceProvider.run_reactor = _dul_reactor  # type: ignore[method-assign]
        _state["applied"] = True
