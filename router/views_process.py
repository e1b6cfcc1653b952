"""The views that dispatch does not read (audit, studies), built in a process of their own.

The supervisor's GIL set the pace of routed delivery: its forwarding threads, the saving of
delivery outcomes and all three views took turns on it. Dispatch reads only the jobs view, so
that one stays in the supervisor; the audit trail and the study index move here, where they
use the other core instead of taking turns with forwarding.

The parent wakes this process (a byte on a pipe) whenever it would wake its own views; on
PostgreSQL it also listens for NOTIFY itself. The parent keeps every view in its runner for
``catch_up`` (start-up and shutdown flushes, tests): batches lock the view's positions, so
two appliers never apply the same events twice (see ``projections.runner.process_batch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from router.settings import Settings

logger = logging.getLogger(__name__)

SEPARATE_VIEWS = ("audit", "studies")


def views_main(settings: Settings, names: list[str], wake_fd: int, signal_fd: int,
               parent_pid: int) -> None:
    """Entry point of the views process: runs the named views until SIGTERM or the parent is
    gone, then flushes them. Writes ``R`` to ``signal_fd`` once running."""
    from router.dicom.receivers import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from projections.audit import AuditView
    from projections.db import open_views
    from projections.runner import ProjectionRunner, View
    from projections.studies import StudiesView
    from router.application.stores import APP_NAMES, open_stores
    from router.gc_tuning import freeze_startup_heap
    from router.logs import configure_logging
    from router.secrets import SecretBox, load_master_key

    configure_logging(settings.log_format, settings.log_level)
    stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                             settings.data_dir)))
    # Not router.service's table: importing it would load pynetdicom and aiohttp here.
    classes: dict[str, type[View]] = {"audit": AuditView, "studies": StudiesView}
    views = [(classes[name](), open_views(settings.database_url, name)) for name in names]
    runner = ProjectionRunner(views, stores.all())
    runner.start()
    if settings.is_postgres:
        runner.listen(settings.database_url, [f"{name}_events" for name in APP_NAMES])
    threading.Thread(target=_forward_wakes, args=(wake_fd, runner.wake), name="views-wake",
                     daemon=True).start()
    freeze_startup_heap()
    with contextlib.suppress(OSError):
        os.write(signal_fd, b"R")
        os.close(signal_fd)
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # parent gone and PDEATHSIG unavailable
            break
    runner.stop()  # the final flush
    for _, db in views:
        db.close()
    stores.close()


def _forward_wakes(wake_fd: int, wake: Callable[[], None]) -> None:
    """Each read from the parent's pipe wakes the views (many pending bytes, one wake)."""
    with contextlib.suppress(OSError):
        while os.read(wake_fd, 4096):
            wake()


class ViewsProcess:
    """Starts, wakes, watches and stops the views process (a plain subprocess, as the
    receivers are)."""

    def __init__(self, settings: Settings, names: tuple[str, ...] = SEPARATE_VIEWS) -> None:
        self._settings = settings
        self.names = names
        self._process: subprocess.Popen[bytes] | None = None
        self._wake_fd = -1
        self._lock = threading.Lock()  # the process and its pipe, swapped on a restart
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> None:
        self._spawn(timeout)
        self._watcher = threading.Thread(target=self._watch, name="views-watch", daemon=True)
        self._watcher.start()
        logger.info("views %s run in process %d", ", ".join(self.names), self.pid)

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else 0

    def _spawn(self, timeout: float) -> None:
        wake_read, wake_write = os.pipe()
        signal_read, signal_write = os.pipe()
        process = subprocess.Popen(
            [sys.executable, "-m", "router.views_process", str(wake_read), str(signal_write),
             str(os.getpid()), ",".join(self.names)],
            stdin=subprocess.PIPE, pass_fds=(wake_read, signal_write))
        os.close(wake_read)
        os.close(signal_write)
        os.set_blocking(wake_write, False)  # a full pipe means wakes are pending already
        assert process.stdin is not None
        with process.stdin as stdin:
            pickle.dump(self._settings, stdin)
        try:
            ready, _, _ = select.select([signal_read], [], [], timeout)
            first = os.read(signal_read, 1) if ready else b""
        finally:
            os.close(signal_read)
        if first != b"R":
            process.kill()
            process.wait(5)
            os.close(wake_write)
            raise RuntimeError("the views process did not start in time (see its log)")
        with self._lock:
            old = self._wake_fd
            self._process, self._wake_fd = process, wake_write
        if old >= 0:
            os.close(old)

    def wake(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            if self._wake_fd >= 0:
                os.write(self._wake_fd, b"W")

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            if not self.alive() and not self._stopping.is_set():
                code = self._process.returncode if self._process is not None else None
                logger.error("views process exited with %s; restarting", code)
                try:
                    self._spawn(60.0)
                except RuntimeError:
                    logger.exception("views process restart failed")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the process flushes its views and exits), wait, kill a straggler."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.error("views process %d did not stop; killing it", process.pid)
                process.kill()
                process.wait(5)
        with self._lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1


if __name__ == "__main__":  # started by ViewsProcess
    # The settings come from our parent, through a pipe only it holds.
    settings_ = pickle.load(sys.stdin.buffer)  # noqa: S301
    views_main(settings_, sys.argv[4].split(","), int(sys.argv[1]), int(sys.argv[2]),
               int(sys.argv[3]))
