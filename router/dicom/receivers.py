"""Receiving in several processes, so receiving is not held to one core by the GIL.

The parent owns the DICOM ports through the front door (:mod:`router.dicom.gate`): once a
connection's A-ASSOCIATE-RQ has arrived and passed its checks, the gate hands it (the
descriptor, over a Unix socket) to the receiver process serving the fewest connections at that
moment. The kernel's own spreading (SO_REUSEPORT, used before) hashes connections to processes:
four concurrent associations landed 3:1 or 4:0 on two processes about five times in eight, and
the busier process's GIL then set the pace. Each child runs the DICOM server on the connections
it is given, with its own Receiver. The parent supervises them and runs views and dispatch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from router.dicom.gate import Gate
from router.dicom.peer import Peer
from router.dicom.scp import hand_connection
from router.dicom.tls import listener_context
from router.settings import Settings

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies (even by kill -9), so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        logger.warning("cannot ask to die with the parent; relying on polling")


def receiver_main(settings: Settings, signal_fd: int, channel_fd: int,
                  parent_pid: int) -> None:
    """Entry point of a receiver process: serves the connections handed over ``channel_fd``
    until SIGTERM or the parent is gone.

    It writes ``R`` to ``signal_fd`` once serving, ``S`` after each saved receipt (the parent
    then wakes its views at once instead of at their next poll) and ``E`` with the connection's
    id (4 bytes) each time it is done with one (the gate counts what each process and each
    address holds).
    """
    import os

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from router.dicom.protocol_log import PROTOCOL_LOG
    from router.dicom.scp import DicomServer
    from router.gc_tuning import freeze_startup_heap
    from router.logs import configure_logging
    from router.wiring import receiver_process

    configure_logging(settings.log_format, settings.log_level)
    os.set_blocking(signal_fd, False)

    def tell_parent(message: bytes) -> None:
        # A full pipe means the parent has wake-ups pending already: dropping one is fine.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(signal_fd, message)

    def connection_done(conn_id: int) -> None:
        # Not dropped: the gate's counts of our connections would stay too high.
        message = b"E" + struct.pack(">I", conn_id)
        for _ in range(1000):
            try:
                os.write(signal_fd, message)  # under PIPE_BUF: never interleaved
                return
            except BlockingIOError:
                time.sleep(0.001)
            except BrokenPipeError:
                return

    process = receiver_process(settings, on_saved=lambda: tell_parent(b"S"))
    services = process.services  # C-FIND/MOVE/GET and N-ACTION may arrive here too
    channel = socket.socket(fileno=channel_fd)
    server = DicomServer(settings, services.receiver, qr=services.qr, channel=channel,
                         on_connection_done=connection_done, commitment=services.commitment)
    server.start()
    freeze_startup_heap()
    tell_parent(b"R")
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # parent gone and PDEATHSIG unavailable
            break
        PROTOCOL_LOG.flush()
    server.stop(grace=settings.dispatch.shutdown_grace)
    process.close()


class _Child:
    """One receiver process, the pipe it signals on and the socket it is handed connections on.
    """

    def __init__(self, settings: Settings, timeout: float) -> None:
        read_fd, write_fd = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "router.dicom.receivers", str(write_fd),
             str(theirs.fileno()), str(os.getpid())],
            stdin=subprocess.PIPE, pass_fds=(write_fd, theirs.fileno()))
        os.close(write_fd)
        theirs.close()
        ours.setblocking(False)  # a child that stopped reading is skipped, not waited for
        self.channel = ours
        self.serving: set[int] = set()  # ids of connections handed over, not yet done
        self.handed = 0  # in all; the tie-breaker between equally busy processes
        self.signals = os.fdopen(read_fd, "rb", buffering=0)
        assert self.process.stdin is not None
        with self.process.stdin as stdin:
            pickle.dump(settings, stdin)
        ready, _, _ = select.select([self.signals], [], [], timeout)
        first = self.signals.read(1) if ready else b""
        if first != b"R":
            self.process.kill()
            self.process.wait(5)
            self.signals.close()
            self.channel.close()
            raise RuntimeError("a receiver process did not start in time (see its log)")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def hand(self, conn: socket.socket, peer: Peer) -> bool:
        """Pass an accepted connection; False when the child cannot take it."""
        return hand_connection(self.channel, conn, peer)


class ReceiverPool:
    """Owns the DICOM ports (through a gate); starts, feeds, watches and stops the receiver
    processes.

    Plain subprocesses, not multiprocessing: its spawn method also starts a resource-tracker
    process (about 13 MB) that receivers do not need.
    """

    def __init__(self, settings: Settings, count: int, on_saved: Callable[[], None]) -> None:
        tls = settings.dicom.tls
        self._gate = Gate(settings.dicom_host, settings.dicom_port, settings.dicom,
                          settings.ae_title, sink=self._hand,
                          tls_context=listener_context(tls) if tls is not None else None)
        # The gate enforces the association limits across processes; each child keeps the
        # whole limit as a second line (it never gets more than the gate lets through).
        self._settings = replace(settings, dicom_port=self._gate.port)
        self._count = count
        self._on_saved = on_saved
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # the children list and their counts
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self._gate.port

    @property
    def tls_port(self) -> int:
        return self._gate.tls_port

    @property
    def gate(self) -> Gate:
        return self._gate

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(self._count):
            self._children.append(self._spawn(timeout))
        thread = threading.Thread(target=self._watch, name="receivers-watch", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._gate.start()
        logger.info("%d receiver processes serving DICOM port %s%s", self._count,
                    self.port or "-", f" and TLS port {self.tls_port}" if self.tls_port else "")

    def _hand(self, conn: socket.socket, peer: Peer) -> bool:
        """To the process serving the fewest connections (round robin among equals)."""
        with self._lock:
            for child in sorted(self._children, key=lambda c: (len(c.serving), c.handed)):
                if not child.alive() or not child.hand(conn, peer):
                    continue  # gone or not reading: the next one
                child.serving.add(peer.conn_id)
                child.handed += 1
                return True
        return False

    def _spawn(self, timeout: float) -> _Child:
        child = _Child(self._settings, timeout)
        reader = threading.Thread(target=self._forward_saves, args=(child,),
                                  name=f"receiver-{child.pid}-wake", daemon=True)
        reader.start()
        return child

    def alive(self) -> bool:
        return all(child.alive() for child in self._children)

    def _forward_saves(self, child: _Child) -> None:
        """Wake the parent's views after a child's saves, count its finished connections;
        ends when the child exits (its connections are then released)."""
        carry = b""
        while data := child.signals.read(4096):
            data, carry = carry + data, b""
            saved, done, carry = _parse_signals(data)
            for conn_id in done:
                with self._lock:
                    child.serving.discard(conn_id)
                self._gate.release(conn_id)
            if saved:
                self._on_saved()
        child.signals.close()
        child.channel.close()
        with self._lock:
            orphans, child.serving = child.serving, set()
        for conn_id in orphans:
            self._gate.release(conn_id)

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, child in enumerate(self._children):
                if not child.alive() and not self._stopping.is_set():
                    logger.error("receiver process %d exited with %s; restarting", child.pid,
                                 child.process.returncode)
                    try:
                        replacement = self._spawn(60.0)
                        with self._lock:
                            self._children[i] = replacement
                    except RuntimeError:
                        logger.exception("receiver restart failed")

    def stop(self, grace: float) -> None:
        """Stop accepting; SIGTERM each child (they finish in-flight C-STOREs), then wait;
        kill stragglers; then close the gate (its TLS tunnels carried those C-STOREs)."""
        self._stopping.set()
        self._gate.close_listeners()
        for child in self._children:
            if child.alive():
                child.process.terminate()
        deadline = time.monotonic() + grace + 5
        for child in self._children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("receiver process %d did not stop; killing it", child.pid)
                child.process.kill()
                child.process.wait(5)
        self._gate.stop()
        for t in self._threads:
            t.join(timeout=2)


def _parse_signals(data: bytes) -> tuple[bool, list[int], bytes]:
    """(a receipt was saved, ids of finished connections, an incomplete tail to keep)."""
    saved, pos = False, 0
    done: list[int] = []
    while pos < len(data):
        kind = data[pos:pos + 1]
        if kind == b"E":
            if pos + 5 > len(data):
                return saved, done, data[pos:]
            done.append(struct.unpack_from(">I", data, pos + 1)[0])
            pos += 5
            continue
        saved |= kind == b"S"
        pos += 1
    return saved, done, b""


if __name__ == "__main__":  # a receiver process started by ReceiverPool
    # The settings come from our parent, through a pipe only it holds.
    settings_ = pickle.load(sys.stdin.buffer)  # noqa: S301
    receiver_main(settings_, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
