"""How we run pynetdicom 3.0.4: PHI logging off, streamed receive into our spool, capped PDUs,
TCP_NODELAY on every socket, and a socket read that does not copy 4 KB at a time.

These are process-wide settings of the library, applied once by :func:`configure_pynetdicom`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import select
import socket
import struct
import textwrap
import threading
import time
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
    transport,
)

from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.protocol_log import quiet_library_errors
from router.dicom.spool import SpoolFile

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, Any] = {"spool_dir": None, "max_pdu": 64 * 1024 * 1024, "applied": False}


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


def _spool_file(*_: Any, **kwargs: Any) -> SpoolFile:
    """Stands in for NamedTemporaryFile inside pynetdicom's chunked C-STORE receive."""
    return SpoolFile(spool_dir())


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


_original_init = transport.AssociationSocket.__init__
_original_connect = transport.AssociationSocket.connect


def _init(self: transport.AssociationSocket, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    _set_nodelay(self.socket)


def _connect(self: transport.AssociationSocket, primitive: Any) -> None:
    _original_connect(self, primitive)
    _set_nodelay(self.socket)


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


def _wait_for_socket(dul_provider: Any) -> None:
    """Sleep the DUL's idle delay, but wake as soon as the peer sends something or our side
    queues a PDU to send."""
    sock = getattr(dul_provider.socket, "socket", None)
    delay = dul_provider._run_loop_delay
    if sock is None:
        time.sleep(delay)
        return
    wake = _wake_socket(dul_provider)
    try:
        readable, _, _ = select.select([sock, wake] if wake else [sock], [], [], delay)
    except (OSError, ValueError):
        time.sleep(delay)
        return
    if wake is not None and wake in readable:
        with contextlib.suppress(OSError):
            wake.recv(4096)


def _wake_socket(dul_provider: Any) -> socket.socket | None:
    """The reading end of this DUL's wake-up pair, made on first use by its reactor thread
    (closed when the reactor ends, see _closing_wake)."""
    pair = dul_provider.__dict__.get("_router_wake")
    if pair is None:
        outgoing = dul_provider.to_provider_queue
        if not isinstance(outgoing, _WakingQueue):
            return None
        try:
            pair = socket.socketpair()
        except OSError:  # out of descriptors: poll as pynetdicom does
            return None
        for end in pair:
            end.setblocking(False)
        dul_provider._router_wake = pair
        outgoing.wake = pair[1]
    return pair[0]


def _closing_wake(run_reactor: Any) -> Any:
    def run(self: Any) -> None:
        try:
            run_reactor(self)
        finally:
            pair = self.__dict__.pop("_router_wake", None)
            if pair is not None:
                outgoing = self.to_provider_queue
                if isinstance(outgoing, _WakingQueue):
                    outgoing.wake = None
                for end in pair:
                    end.close()

    return run


def _patched(func: Any, old: str, new: str, helpers: dict[str, Any]) -> Any:
    """``func`` recompiled from its source with one line replaced (None if it is not there).

    pynetdicom's reactors poll with fixed sleeps (about 2.5 ms of waiting per message); we
    make them wait on the event they poll for. Found by source so that a pynetdicom upgrade
    that changes the line leaves the original in place (with a warning) rather than breaking.
    """
    source = textwrap.dedent(inspect.getsource(func))
    if source.count(old) != 1:
        logger.warning("pynetdicom %s changed; reactor tuning not applied", func.__qualname__)
        return None
    namespace = dict(vars(inspect.getmodule(func)))
    namespace.update(helpers)
    exec(compile(source.replace(old, new), inspect.getsourcefile(func) or "<pynetdicom>",  # noqa: S102 - pynetdicom's own source
                 "exec"), namespace)
    return namespace[func.__name__]


def _tune_reactors() -> None:
    reactor = _patched(association.Association._run_reactor, "time.sleep(0.001)",
                       "_router_wait_for_message(self)",
                       {"_router_wait_for_message": _wait_for_message})
    if reactor is not None:
        association.Association._run_reactor = reactor  # type: ignore[method-assign]
    run = _patched(dul.DULServiceProvider.run_reactor, "time.sleep(self._run_loop_delay)",
                   "_router_wait_for_socket(self)", {"_router_wait_for_socket": _wait_for_socket})
    if run is not None:
        dul.DULServiceProvider.run_reactor = _closing_wake(run)  # type: ignore[method-assign]


SEND_QUEUE_PDUS = 8
# The DUL reactor's select timeout. Arriving data and PDUs queued to send wake it at once, so
# this only paces the checks for a stop request and the ARTIM timer: short enough that ending an
# association is quick, long enough that an idle association costs no CPU (pynetdicom's 1 ms
# polling cost about a third of a receiver's CPU time per small C-STORE).
DUL_IDLE_DELAY = 0.005
MAX_SEND_PDU = 4 * 1024 * 1024
_peer_max_pdu = dimse.DIMSEServiceProvider.maximum_pdu_size


def _capped_peer_max_pdu(self: dimse.DIMSEServiceProvider) -> int:
    """The PDU size we send with: the peer's maximum, but never unlimited or above 4 MiB
    (pynetdicom would send a 1 GB instance to an "unlimited" peer as one 1 GB PDU)."""
    peer = int(_peer_max_pdu.fget(self))  # type: ignore[attr-defined]
    return MAX_SEND_PDU if peer == 0 or peer > MAX_SEND_PDU else peer


def configure_pynetdicom(spool_dir: Path, max_incoming_pdu: int, idle_delay: float) -> None:
    """Apply our settings to the pynetdicom library (idempotent; latest values win)."""
    with _lock:
        spool_dir.mkdir(parents=True, exist_ok=True)
        _state["spool_dir"] = spool_dir
        _state["max_pdu"] = max_incoming_pdu
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        # Its standard handlers format every PDU and message for log lines our logging
        # configuration drops (the pynetdicom logger is at WARNING): pure cost.
        _config.LOG_HANDLER_LEVEL = "none"
        _set_idle_delay(idle_delay)
        quiet_library_errors()  # a peer's bad PDU: one line, no traceback, rate-limited
        if _state["applied"]:
            return
        dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[assignment]
        dimse_messages.create_file_meta = _file_meta  # type: ignore[assignment]
        dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[assignment]
        transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        transport.AssociationSocket.__init__ = _init  # type: ignore[method-assign]
        transport.AssociationSocket.connect = _connect  # type: ignore[method-assign]
        _tune_reactors()
        dimse.DIMSEServiceProvider.maximum_pdu_size = property(  # type: ignore[method-assign,assignment]
            _capped_peer_max_pdu)
        _state["applied"] = True


def _set_idle_delay(delay: float) -> None:
    """pynetdicom's DUL loop sleeps this long when idle (1 ms by default)."""
    original = dul.DULServiceProvider.__init__
    if getattr(original, "_router_wrapped", False):
        original = original.__wrapped__  # type: ignore[attr-defined]

    def init(self: dul.DULServiceProvider, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._run_loop_delay = delay
        # Bounded: a chunked send from a file otherwise queues every fragment of the file
        # (1 GB in memory for a 1 GB instance) faster than the socket drains them.
        self.to_provider_queue = _WakingQueue(maxsize=SEND_QUEUE_PDUS)

    init.__wrapped__ = original  # type: ignore[attr-defined]
    init._router_wrapped = True  # type: ignore[attr-defined]
    dul.DULServiceProvider.__init__ = init  # type: ignore[method-assign]
