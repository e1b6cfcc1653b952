"""Receiving in several processes: each child runs a DICOM listener on the same port
(SO_REUSEPORT, the kernel spreads associations) with its own Receiver, so receiving is not
held to one core by the GIL. The parent supervises them and runs views and dispatch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import select
import signal
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


def receiver_main(settings: Settings, signal_fd: int, parent_pid: int) -> None:
    """Entry point of a receiver process: a listener, until SIGTERM or the parent is gone.

    It writes ``R`` to ``signal_fd`` once listening and ``S`` after each saved receipt (the
    parent then wakes its views at once instead of at their next poll).
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

    receiver = Receiver(stores, blobs, AdminState(stores.admin), settings.ingest,
                        settings.dispatch, on_saved=lambda: tell_parent(b"S"))
    qr, studies = standalone(settings, stores, blobs)  # C-FIND/MOVE/GET may arrive here too
    server = DicomServer(settings, receiver, reuse_port=True, qr=qr)
    server.start()
    tell_parent(b"R")
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # parent gone and PDEATHSIG unavailable
            break
    server.stop(grace=settings.dispatch.shutdown_grace)
    studies.close()
    stores.close()


class _Child:
    """One receiver process and the pipe it signals on."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        read_fd, write_fd = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "router.dicom.receivers", str(write_fd), str(os.getpid())],
            stdin=subprocess.PIPE, pass_fds=(write_fd,))
        os.close(write_fd)
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
            raise RuntimeError("a receiver process did not start in time (see its log)")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


class ReceiverPool:
    """Starts, watches and stops the receiver processes.

    Plain subprocesses, not multiprocessing: its spawn method also starts a resource-tracker
    process (about 13 MB) that receivers do not need.
    """

    def __init__(self, settings: Settings, count: int, on_saved: Callable[[], None]) -> None:
        per_process = max(1, -(-settings.dicom.max_associations // count))
        self._settings = replace(settings, dicom=replace(settings.dicom,
                                                         max_associations=per_process))
        self._count = count
        self._on_saved = on_saved
        self._children: list[_Child] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(self._count):
            self._children.append(self._spawn(timeout))
        watcher = threading.Thread(target=self._watch, name="receivers-watch", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        logger.info("%d receiver processes listening", self._count)

    def _spawn(self, timeout: float) -> _Child:
        child = _Child(self._settings, timeout)
        reader = threading.Thread(target=self._forward_saves, args=(child,),
                                  name=f"receiver-{child.pid}-wake", daemon=True)
        reader.start()
        return child

    def alive(self) -> bool:
        return all(child.alive() for child in self._children)

    def _forward_saves(self, child: _Child) -> None:
        """Wake the parent's views after a child's saves; ends when the child exits."""
        while data := child.signals.read(4096):
            if b"S" in data:
                self._on_saved()
        child.signals.close()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, child in enumerate(self._children):
                if not child.alive() and not self._stopping.is_set():
                    logger.error("receiver process %d exited with %s; restarting", child.pid,
                                 child.process.returncode)
                    try:
                        self._children[i] = self._spawn(60.0)
                    except RuntimeError:
                        logger.exception("receiver restart failed")

    def stop(self, grace: float) -> None:
        """SIGTERM each child (they finish in-flight C-STOREs), then wait; kill stragglers."""
        self._stopping.set()
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
    receiver_main(settings_, int(sys.argv[1]), int(sys.argv[2]))
