"""Receiving in several processes, so receiving is not held to one core by the GIL.

The parent owns the DICOM port: it accepts each connection and hands it (the descriptor, over a
Unix socket) to the receiver process serving the fewest connections at that moment. The kernel's
own spreading (SO_REUSEPORT, used before) hashes connections to processes: four concurrent
associations landed 3:1 or 4:0 on two processes about five times in eight, and the busier
process's GIL then set the pace. Each child runs the DICOM server on the connections it is
given, with its own Receiver. The parent supervises them and runs views and dispatch.
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
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

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
    then wakes its views at once instead of at their next poll) and ``E`` each time it is done
    with a connection (the parent counts what each process is serving).
    """
    import os

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from router.application.admin_state import AdminState
    from router.application.receive import Receiver
    from router.application.stores import open_stores
    from router.dicom.qr_scp import standalone
    from router.dicom.scp import DicomServer
    from router.dicom.tuning import DUL_IDLE_DELAY, configure_pynetdicom
    from router.gc_tuning import freeze_startup_heap
    from router.logs import configure_logging
    from router.secrets import SecretBox, load_master_key
    from router.storage.blobs import BlobStore

    configure_logging(settings.log_format, settings.log_level)
    box = SecretBox(load_master_key(settings.secret_key, settings.data_dir))
    stores = open_stores(settings, box)
    blobs = BlobStore(settings.data_dir)
    configure_pynetdicom(blobs.spool_dir, settings.dicom.max_incoming_pdu,
                        idle_delay=DUL_IDLE_DELAY)
    os.set_blocking(signal_fd, False)

    def tell_parent(message: bytes) -> None:
        # A full pipe means the parent has wake-ups pending already: dropping one is fine.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(signal_fd, message)

    def connection_done() -> None:
        # Not dropped: the parent's count of our connections would stay too high.
        for _ in range(1000):
            try:
                os.write(signal_fd, b"E")
                return
            except BlockingIOError:
                time.sleep(0.001)
            except BrokenPipeError:
                return

    receiver = Receiver(stores, blobs, AdminState(stores.admin), settings.ingest,
                        settings.dispatch, on_saved=lambda: tell_parent(b"S"))
    qr, studies = standalone(settings, stores, blobs)  # C-FIND/MOVE/GET may arrive here too
    channel = socket.socket(fileno=channel_fd)
    server = DicomServer(settings, receiver, qr=qr, channel=channel,
                         on_connection_done=connection_done)
    server.start()
    freeze_startup_heap()
    tell_parent(b"R")
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # parent gone and PDEATHSIG unavailable
            break
    server.stop(grace=settings.dispatch.shutdown_grace)
    studies.close()
    stores.close()


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
        self.serving = 0  # connections handed over and not yet reported done
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

    def hand(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Pass an accepted connection (raises OSError when the child cannot take it)."""
        socket.send_fds(self.channel, [f"{address[0]} {address[1]}".encode("ascii")],
                        [conn.fileno()])


class ReceiverPool:
    """Owns the DICOM port; starts, feeds, watches and stops the receiver processes.

    Plain subprocesses, not multiprocessing: its spawn method also starts a resource-tracker
    process (about 13 MB) that receivers do not need.
    """

    def __init__(self, settings: Settings, count: int, on_saved: Callable[[], None]) -> None:
        # Connections go to the least busy process, so a per-process share of the limit adds up
        # to the configured limit.
        per_process = max(1, -(-settings.dicom.max_associations // count))
        self._listener = socket.create_server((settings.dicom_host, settings.dicom_port),
                                              backlog=64)
        self._listener.settimeout(1.0)  # the accept loop sees a stop within a second
        port = int(self._listener.getsockname()[1])  # the one bound when port 0 was asked
        self._settings = replace(settings, dicom_port=port, dicom=replace(
            settings.dicom, max_associations=per_process))
        self._count = count
        self._on_saved = on_saved
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # the children list and their counts
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self._settings.dicom_port

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(self._count):
            self._children.append(self._spawn(timeout))
        for target, name in ((self._watch, "receivers-watch"), (self._accept, "dicom-accept")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("%d receiver processes serving port %d", self._count, self.port)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                logger.error("accepting a DICOM connection failed: %s",
                             exc.strerror or type(exc).__name__)
                time.sleep(0.1)  # EMFILE and the like: do not spin
                continue
            with conn:
                self._hand(conn, address)

    def _hand(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """To the process serving the fewest connections (round robin among equals)."""
        with self._lock:
            for child in sorted(self._children, key=lambda c: (c.serving, c.handed)):
                if not child.alive():
                    continue
                try:
                    child.hand(conn, address)
                except OSError:
                    continue  # gone or not reading: the next one
                child.serving += 1
                child.handed += 1
                return
        logger.error("no receiver process could take a DICOM connection; closed it")

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
        ends when the child exits."""
        while data := child.signals.read(4096):
            if done := data.count(b"E"):
                with self._lock:
                    child.serving = max(0, child.serving - done)
            if b"S" in data:
                self._on_saved()
        child.signals.close()
        child.channel.close()

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
        kill stragglers."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop at once
        self._listener.close()
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
        for t in self._threads:
            t.join(timeout=2)


if __name__ == "__main__":  # a receiver process started by ReceiverPool
    # The settings come from our parent, through a pipe only it holds.
    settings_ = pickle.load(sys.stdin.buffer)  # noqa: S301
    receiver_main(settings_, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
