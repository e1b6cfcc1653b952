"""Receiving in several processes: each child runs a DICOM listener on the same port
(SO_REUSEPORT, the kernel spreads associations) with its own Receiver, so receiving is not
held to one core by the GIL. The parent supervises them and runs views and dispatch.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

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


def receiver_main(settings: Settings, ready: MpEvent, saved: MpEvent, parent_pid: int) -> None:
    """Entry point of a receiver process (spawned: nothing inherited but the arguments)."""
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
    from router.dicom.tuning import configure_pynetdicom
    from router.logs import configure_logging
    from router.secrets import SecretBox, load_master_key
    from router.storage.blobs import BlobStore

    configure_logging(settings.log_format, settings.log_level)
    box = SecretBox(load_master_key(settings.secret_key, settings.data_dir))
    stores = open_stores(settings, box)
    blobs = BlobStore(settings.data_dir)
    configure_pynetdicom(blobs.spool_dir, settings.dicom.max_incoming_pdu, idle_delay=0.0005)

    def wake_parent() -> None:
        if not saved.is_set():  # set() notifies through semaphores: skip when already set
            saved.set()

    receiver = Receiver(stores, blobs, AdminState(stores.admin), settings.ingest,
                        settings.dispatch, on_saved=wake_parent)
    qr, studies = standalone(settings, stores, blobs)  # C-FIND/MOVE/GET may arrive here too
    server = DicomServer(settings, receiver, reuse_port=True, qr=qr)
    server.start()
    ready.set()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # parent gone and PDEATHSIG unavailable
            break
    server.stop(grace=settings.dispatch.shutdown_grace)
    studies.close()
    stores.close()


class ReceiverPool:
    """Starts, watches and stops the receiver processes."""

    def __init__(self, settings: Settings, count: int, on_saved: Callable[[], None]) -> None:
        per_process = max(1, -(-settings.dicom.max_associations // count))
        self._settings = replace(settings, dicom=replace(settings.dicom,
                                                         max_associations=per_process))
        self._count = count
        self._on_saved = on_saved
        self._ctx = multiprocessing.get_context("spawn")
        self._saved = self._ctx.Event()
        self._procs: list[Any] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(self._count):
            self._procs.append(self._spawn(timeout))
        for target, name in ((self._forward_saves, "receivers-wake"),
                             (self._watch, "receivers-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("%d receiver processes listening", self._count)

    def _spawn(self, timeout: float) -> Any:
        import os

        ready = self._ctx.Event()
        proc = self._ctx.Process(target=receiver_main, name="dicom-receiver",
                                 args=(self._settings, ready, self._saved, os.getpid()))
        proc.start()
        if not ready.wait(timeout):
            proc.terminate()
            raise RuntimeError("a receiver process did not start in time (see its log)")
        return proc

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _forward_saves(self) -> None:
        while not self._stopping.is_set():
            if self._saved.wait(0.5):
                self._saved.clear()
                self._on_saved()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self._procs):
                if not proc.is_alive() and not self._stopping.is_set():
                    logger.error("receiver process %d exited with %s; restarting", proc.pid,
                                 proc.exitcode)
                    try:
                        self._procs[i] = self._spawn(60.0)
                    except RuntimeError:
                        logger.exception("receiver restart failed")

    def stop(self, grace: float) -> None:
        """SIGTERM each child (they finish in-flight C-STOREs), then wait; kill stragglers."""
        self._stopping.set()
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace + 5
        for proc in self._procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                logger.error("receiver process %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        for t in self._threads:
            t.join(timeout=2)
