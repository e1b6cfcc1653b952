"""The front door of the DICOM ports: every connection is accepted here and waits, without a
thread or an association slot, until its A-ASSOCIATE-RQ has fully arrived (the ARTIM timer,
PS3.8 9.1.5). Only then is it checked (called/calling AE, presentation contexts, associations
per address and in all) and handed to a receiver, which reads the request itself.

One thread watches every waiting connection with a selector. Limits apply per source address
(the real one when a trusted TCP balancer sends a PROXY v2 header) and in total; over a limit a
connection is closed at once or refused with an A-ASSOCIATE-RJ, never left hanging. TLS
connections are handshaken here too, and their plaintext is carried to the receiver over a
local socket (:mod:`router.dicom.tls_tunnel`), so a receiver never waits on a slow handshake.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from router.dicom import association_policy, pdus, proxy_protocol
from router.dicom.association_policy import AssociationPolicy, Rejection
from router.dicom.peer import Peer
from router.dicom.protocol_log import PROTOCOL_LOG, ProtocolLog
from router.dicom.tls import describe_failure, peer_subject
from router.dicom.tls_tunnel import Tunnel
from router.settings import DicomSettings

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes of A-ASSOCIATE-RQ; what a socket buffers without reading
ACCEPTS_PER_WAKE = 256  # then the waiting connections get a turn
BACKLOG = 1024

Sink = Callable[[socket.socket, Peer], bool]  # takes a connection (True) or cannot (False)


@dataclass
class GateStats:
    """Counters since start, for /metrics and the abuse benchmark."""

    accepted: int = 0
    handed: int = 0
    closed_pending_cap: int = 0
    closed_address_cap: int = 0
    closed_before_request: int = 0  # connected and closed, or sent nothing (scans)
    artim_expired: int = 0
    protocol_errors: int = 0
    tls_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class _Waiting:
    """A connection that has not yet sent its whole A-ASSOCIATE-RQ."""

    sock: socket.socket
    conn_id: int
    peer_ip: str  # the connecting address (a balancer's, when proxied)
    host: str  # the sender's address as we believe it
    port: int
    deadline: float
    counted: str | None  # the address its connection is counted against
    phase: str  # "proxy" | "handshake" | "request"
    wants_tls: bool = False  # a TLS listener's connection, not yet wrapped (PROXY header first)
    tls: ssl.SSLSocket | None = None  # once wrapped; then also ``sock``
    plaintext: bytearray = field(default_factory=bytearray)  # TLS: what was decrypted so far


class Gate:
    """Owns the listening sockets; ``sink`` receives each connection worth serving."""

    def __init__(self, host: str, port: int, dicom: DicomSettings, ae_title: str,
                 sink: Sink, tls_context: ssl.SSLContext | None = None,
                 log: ProtocolLog = PROTOCOL_LOG) -> None:
        self._dicom = dicom
        self._sink = sink
        self._tls_context = tls_context
        self._log = log
        self._policy = AssociationPolicy(
            ae_title=ae_title, require_called_aet=dicom.require_called_aet,
            known_calling_aets=(frozenset(a.strip() for a in dicom.known_calling_aets)
                                if dicom.require_known_calling_ae else None))
        self._proxies = tuple(ip_network(n, strict=False) for n in dicom.trusted_proxies)
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # the counts below; release() comes from other threads
        self._waiting: dict[int, _Waiting] = {}
        self._handed: dict[int, str] = {}  # conn id -> the address it is counted against
        self._connections: Counter[str] = Counter()
        self._associations: Counter[str] = Counter()
        self._tunnels: set[Tunnel] = set()
        self._pending_calls: list[Callable[[], None]] = []  # run by the loop (close_listeners)
        # (address, calling AE, why) of each refused A-ASSOCIATE-RQ: the router's audit
        # (router/dicom/refusals.py) counts them; must be quick and never raise.
        self.on_refused: Callable[[str, str, str], None] | None = None
        self._next_id = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = GateStats()
        self.port = self.tls_port = 0
        self._listeners: list[socket.socket] = []
        if dicom.plain_listener:
            self.port = self._listen(host, port, tls=False)
        if dicom.tls is not None:
            if tls_context is None:
                raise ValueError("a TLS listener needs its SSL context")
            self.tls_port = self._listen(host, dicom.tls.port, tls=True)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)

    def _listen(self, host: str, port: int, tls: bool) -> int:
        listener = socket.create_server((host, port), backlog=BACKLOG)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._selector.register(listener, selectors.EVENT_READ,
                                lambda _mask: self._accept(listener, tls))
        return int(listener.getsockname()[1])

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-gate", daemon=True)
        self._thread.start()

    def close_listeners(self) -> None:
        """Stop taking connections (those waiting are closed); tunnels keep carrying
        associations until :meth:`stop`."""
        self._call_in_loop(self._close_listeners_now)

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for tunnel in list(self._tunnels):
            tunnel.close()
        self._close_listeners_now()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def release(self, conn_id: int) -> None:
        """A handed connection is finished with (its association ended)."""
        with self._lock:
            address = self._handed.pop(conn_id, None)
            if address is None:
                return
            self._associations[address] -= 1
            if self._associations[address] <= 0:
                del self._associations[address]
            self._uncount(address)

    def snapshot(self) -> dict[str, int]:
        """Current load: connections waiting, associations handed, TLS tunnels."""
        with self._lock:
            return {"pending": len(self._waiting), "associations": len(self._handed),
                    "tunnels": len(self._tunnels)}

    # -- the loop -------------------------------------------------------------------------

    def _call_in_loop(self, call: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            call()
            return
        done = threading.Event()

        def run() -> None:
            try:
                call()
            finally:
                done.set()

        with self._lock:
            self._pending_calls.append(run)
        self._wake()
        done.wait(5)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self, _mask: int) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)
        with self._lock:
            calls, self._pending_calls = self._pending_calls, []
        for call in calls:
            call()

    def _run(self) -> None:
        next_flush = time.monotonic() + 1.0
        while not self._stopping.is_set():
            timeout = self._time_to_next_deadline()
            try:
                events = self._selector.select(timeout)
            except OSError:  # a descriptor closed under us; the next round is clean
                events = []
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:  # a bug of ours: never let it stop the door
                    logger.exception("DICOM gate: handling a connection failed")
            now = time.monotonic()
            self._expire(now)
            if now >= next_flush:
                self._log.flush()
                next_flush = now + 1.0

    def _time_to_next_deadline(self) -> float:
        if not self._waiting:
            return 1.0
        soonest = min(w.deadline for w in self._waiting.values())
        return max(0.0, min(1.0, soonest - time.monotonic()))

    def _expire(self, now: float) -> None:
        for waiting in [w for w in self._waiting.values() if w.deadline <= now]:
            if waiting.phase == "handshake":
                self.stats.tls_failures += 1
                self._log.warning(waiting.host, "TLS handshake timed out; closed")
            elif waiting.phase == "request" and (waiting.plaintext or _buffered(waiting.sock)):
                self.stats.artim_expired += 1
                self._log.warning(waiting.host, "A-ASSOCIATE-RQ incomplete after %.0f s "
                                  "(ARTIM); closed", self._dicom.artim_timeout)
            else:
                self.stats.closed_before_request += 1  # silent: nothing to report
            self._close_waiting(waiting)

    # -- accepting ------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("accepting a DICOM connection failed: %s; pausing 0.1 s",
                                 exc.strerror)
                    time.sleep(0.1)  # out of descriptors: let connections finish
                return
            self.stats.accepted += 1
            self._admit(sock, str(address[0]), int(address[1]), tls)

    def _admit(self, sock: socket.socket, ip: str, port: int, tls: bool) -> None:
        proxied = self._is_proxy(ip)
        with self._lock:
            if len(self._waiting) >= self._dicom.max_pending_connections:
                self.stats.closed_pending_cap += 1
                refused = "pending"
            elif not proxied and self._connections[ip] >= self._dicom.max_connections_per_ip:
                self.stats.closed_address_cap += 1
                refused = "address"
            else:
                refused = ""
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
                conn_id = self._next_id
                counted = None if proxied else ip
                if counted is not None:
                    self._connections[counted] += 1
        if refused:
            _close_now(sock)
            what = ("connections awaiting their request are at the limit "
                    f"({self._dicom.max_pending_connections})" if refused == "pending" else
                    f"connections from this address are at the limit "
                    f"({self._dicom.max_connections_per_ip})")
            self._log.warning(ip, "%s; closed a new one", what)
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        waiting = _Waiting(sock, conn_id, ip, ip, port,
                           time.monotonic() + self._dicom.artim_timeout, counted,
                           "proxy" if proxied else "request", wants_tls=tls)
        with self._lock:
            self._waiting[conn_id] = waiting
        self._selector.register(sock, selectors.EVENT_READ,
                                lambda mask, w=waiting: self._on_waiting(w, mask))
        if tls and not proxied:
            self._start_tls(waiting)

    def _start_tls(self, waiting: _Waiting) -> None:
        """Wrap the connection (the TLS object takes over its descriptor) and handshake."""
        assert self._tls_context is not None
        callback = self._selector.get_key(waiting.sock).data
        self._selector.unregister(waiting.sock)
        waiting.tls = self._tls_context.wrap_socket(waiting.sock, server_side=True,
                                                    do_handshake_on_connect=False)
        waiting.sock = waiting.tls
        waiting.wants_tls = False
        waiting.deadline = time.monotonic() + self._dicom.tls.handshake_timeout \
            if self._dicom.tls is not None else waiting.deadline
        waiting.phase = "handshake"
        self._selector.register(waiting.sock, selectors.EVENT_READ, callback)

    def _is_proxy(self, ip: str) -> bool:
        if not self._proxies:
            return False
        try:
            address = ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    # -- waiting for the request ---------------------------------------------------------

    def _on_waiting(self, waiting: _Waiting, _mask: int) -> None:
        try:
            if waiting.phase == "proxy":
                self._read_proxy(waiting)
            if waiting.phase == "handshake":
                self._handshake(waiting)
            if waiting.phase == "request":
                self._read_request(waiting)
        except _Closed:
            self.stats.closed_before_request += 1
            self._close_waiting(waiting)
        except _Done:
            pass
        except proxy_protocol.ProxyHeaderError as exc:
            self._protocol_error(waiting, f"bad PROXY header from a trusted balancer: {exc}",
                                 abort=False)
        except pdus.PduError as exc:
            self._protocol_error(waiting, str(exc), abort=True)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.stats.tls_failures += 1
            self._log.warning(waiting.host, "%s; closed", describe_failure(exc))
            self._close_waiting(waiting)
        except OSError as exc:
            self._log.warning(waiting.host, "connection failed before association: %s",
                              exc.strerror or type(exc).__name__)
            self._close_waiting(waiting)

    def _read_proxy(self, waiting: _Waiting) -> None:
        data = _peek(waiting.sock, proxy_protocol.HEADER + proxy_protocol.MAX_LENGTH)
        if data is None:
            return
        if not data:
            raise _Closed
        if not proxy_protocol.starts_like_proxy(data[:12]):
            self._to_next_phase(waiting)  # the balancer's host itself, not a proxied peer
            return
        header = proxy_protocol.parse(data)
        if header is None:
            _set_lowat(waiting.sock, proxy_protocol.HEADER if len(data) < proxy_protocol.HEADER
                       else proxy_protocol.HEADER + struct.unpack_from(">H", data, 14)[0])
            return
        _consume(waiting.sock, header.length)
        _set_lowat(waiting.sock, 1)
        if header.source is not None:
            real = header.source[0]
            with self._lock:
                if self._connections[real] >= self._dicom.max_connections_per_ip:
                    self.stats.closed_address_cap += 1
                    full = True
                else:
                    full = False
                    self._connections[real] += 1
                    waiting.counted = real
            waiting.host, waiting.port = real, header.source[1]
            if full:
                self._log.warning(real, "connections from this address are at the limit "
                                  "(%d); closed a new one", self._dicom.max_connections_per_ip)
                self._close_waiting(waiting)
                raise _Done
        self._to_next_phase(waiting)

    def _to_next_phase(self, waiting: _Waiting) -> None:
        if waiting.counted is None:  # not proxied after all: count it against the balancer
            with self._lock:
                self._connections[waiting.peer_ip] += 1
                waiting.counted = waiting.peer_ip
        if waiting.wants_tls:
            self._start_tls(waiting)
        else:
            waiting.phase = "request"

    def _handshake(self, waiting: _Waiting) -> None:
        assert waiting.tls is not None
        try:
            waiting.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(waiting.sock, selectors.EVENT_READ, self._selector.get_key(
                waiting.sock).data)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(waiting.sock, selectors.EVENT_WRITE, self._selector.get_key(
                waiting.sock).data)
            return
        self._selector.modify(waiting.sock, selectors.EVENT_READ,
                              self._selector.get_key(waiting.sock).data)
        waiting.phase = "request"
        waiting.deadline = time.monotonic() + self._dicom.artim_timeout  # ARTIM from here

    def _read_request(self, waiting: _Waiting) -> None:
        data = self._available(waiting)
        if len(data) < 6:
            self._need(waiting, 6)
            return
        kind, length = data[0], struct.unpack_from(">L", data, 2)[0]
        if kind != pdus.A_ASSOCIATE_RQ:
            raise pdus.PduError(f"first PDU is of type 0x{kind:02X}, not an A-ASSOCIATE-RQ")
        if length > MAX_REQUEST:
            raise pdus.PduError(f"A-ASSOCIATE-RQ of {length} bytes (at most {MAX_REQUEST})")
        if len(data) < 6 + length:
            self._need(waiting, 6 + length)
            return
        body = bytes(data[6:6 + length])
        request = pdus.parse_associate_rq(body)
        rejection = association_policy.check(body, request, self._policy)
        if rejection is None:
            rejection = self._claim(waiting)
        if rejection is not None:
            self._reject(waiting, rejection, 6 + length, request.calling_aet)
            return
        self._hand(waiting)

    def _available(self, waiting: _Waiting) -> bytes:
        """The request's bytes so far (peeked on plain connections, decrypted on TLS)."""
        if waiting.tls is None:
            data = _peek(waiting.sock, 6 + MAX_REQUEST)
            if data is None:
                return b""  # woken for nothing
            if not data:
                raise _Closed
            return data
        while True:
            try:
                chunk = waiting.tls.recv(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                raise _Closed
            waiting.plaintext += chunk
            if len(waiting.plaintext) > 6 + MAX_REQUEST or not waiting.tls.pending():
                break
        return bytes(waiting.plaintext)

    def _need(self, waiting: _Waiting, total: int) -> None:
        """Be woken when ``total`` bytes are there (plain connections: not before)."""
        if waiting.tls is None:
            _set_lowat(waiting.sock, total)

    def _claim(self, waiting: _Waiting) -> Rejection | None:
        """Take an association slot for this connection, or say which limit is reached."""
        address = waiting.counted or waiting.host
        with self._lock:
            if len(self._handed) >= self._dicom.max_associations:
                return association_policy.over_limit(
                    f"associations at the limit ({self._dicom.max_associations})")
            if self._associations[address] >= self._dicom.max_associations_per_ip:
                return association_policy.over_limit(
                    f"associations from this address at the limit "
                    f"({self._dicom.max_associations_per_ip})")
            self._associations[address] += 1
            self._handed[waiting.conn_id] = address
            del self._waiting[waiting.conn_id]
        return None

    def _hand(self, waiting: _Waiting) -> None:
        self._selector.unregister(waiting.sock)
        peer = Peer(waiting.conn_id, waiting.host, waiting.port,
                    tls=waiting.tls is not None,
                    tls_subject=peer_subject(waiting.tls) if waiting.tls is not None else "")
        try:
            if waiting.tls is None:
                _set_lowat(waiting.sock, 1)
                waiting.sock.setblocking(True)
                taken = self._sink(waiting.sock, peer)
                waiting.sock.close()  # the receiver has its own descriptor now
            else:
                taken = self._hand_tunnel(waiting, peer)
        except OSError:
            taken = False
        if not taken:
            logger.error("no receiver could take a DICOM association; closed it")
            with contextlib.suppress(OSError):
                waiting.sock.close()
            self.release(waiting.conn_id)
            return
        self.stats.handed += 1

    def _hand_tunnel(self, waiting: _Waiting, peer: Peer) -> bool:
        assert waiting.tls is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            taken = self._sink(theirs, peer)
        finally:
            theirs.close()
        if not taken:
            ours.close()
            return False
        tunnel = Tunnel(waiting.tls, ours, bytes(waiting.plaintext), self._selector,
                        on_closed=self._tunnel_closed)
        self._tunnels.add(tunnel)
        return True

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self._tunnels.discard(tunnel)

    def _reject(self, waiting: _Waiting, rejection: Rejection, length: int,
                calling_aet: str = "") -> None:
        self.stats.rejected[rejection.why.split(" (")[0]] += 1
        self._log.warning(waiting.host, "association refused: %s", rejection.why)
        if self.on_refused is not None:
            self.on_refused(waiting.host, calling_aet, rejection.why)
        with contextlib.suppress(OSError):
            if waiting.tls is None:
                _consume(waiting.sock, length)  # else our close would reset, losing the RJ
                waiting.sock.setblocking(True)
                waiting.sock.settimeout(1.0)
                waiting.sock.sendall(rejection.pdu())
            else:
                waiting.tls.setblocking(True)
                waiting.tls.settimeout(1.0)
                waiting.tls.sendall(rejection.pdu())
        self._close_waiting(waiting)

    def _protocol_error(self, waiting: _Waiting, why: str, abort: bool) -> None:
        self.stats.protocol_errors += 1
        self._log.warning(waiting.host, "protocol error before association: %s; closed", why)
        if abort:
            with contextlib.suppress(OSError):
                waiting.sock.send(pdus.encode_abort(2, 2))  # unrecognised/unexpected PDU
        self._close_waiting(waiting)

    def _close_waiting(self, waiting: _Waiting) -> None:
        with self._lock:
            if self._waiting.pop(waiting.conn_id, None) is None:
                return
            if waiting.counted is not None:
                self._uncount(waiting.counted)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(waiting.sock)
        _close_now(waiting.sock)

    def _uncount(self, address: str) -> None:
        self._connections[address] -= 1
        if self._connections[address] <= 0:
            del self._connections[address]

    def _close_listeners_now(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener)
            listener.close()
        self._listeners = []
        for waiting in list(self._waiting.values()):
            self._close_waiting(waiting)


class _Closed(Exception):
    """The peer closed before its request was complete."""


class _Done(Exception):
    """The connection was dealt with (closed) while being read."""


def _peek(sock: socket.socket, size: int) -> bytes | None:
    """What is buffered, without consuming it; b"" at end of file, None if nothing yet."""
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None


def _buffered(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _consume(sock: socket.socket, length: int) -> None:
    """Read and drop ``length`` bytes that are already buffered."""
    while length > 0:
        chunk = sock.recv(min(length, 65536))
        if not chunk:
            raise _Closed
        length -= len(chunk)


def _set_lowat(sock: socket.socket, size: int) -> None:
    """Let the selector report the socket readable only once ``size`` bytes are buffered (or
    it is closed): a peeked, incomplete request would otherwise wake the loop endlessly."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, size))


def _close_now(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
