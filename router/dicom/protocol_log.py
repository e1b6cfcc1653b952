"""Logging protocol errors from peers: one line each, no traceback, and past a rate one summary
line per address per minute, so a storm of garbage cannot flood the log (or the disk under it).

Messages name the peer's address and what was wrong with its PDU, never dataset contents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("router.dicom.protocol")

WINDOW = 60.0  # seconds
PER_WINDOW = 10  # lines per address per window, then one summary line


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class ProtocolLog:
    """Rate-limited warnings keyed by peer address (thread-safe)."""

    def __init__(self, per_window: int = PER_WINDOW, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger = logger) -> None:
        self._per_window = per_window
        self._window = window
        self._clock = clock
        self._log = log
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def warning(self, address: str, message: str, *args: object) -> None:
        """Log ``message % args`` for ``address`` unless it has had its share this window."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(address)
            if window is not None and now - window.started >= self._window:
                self._summarise(address, window)
                window = None
            if window is None:
                window = self._windows[address] = _Window(now)
            if window.logged >= self._per_window:
                window.suppressed += 1
                return
            window.logged += 1
        self._log.warning("%s: " + message, address, *args)

    def flush(self) -> None:
        """Summarise and forget the windows that have ended (call about once a second)."""
        now = self._clock()
        with self._lock:
            for address, window in list(self._windows.items()):
                if now - window.started >= self._window:
                    self._summarise(address, window)
                    del self._windows[address]

    def forget(self) -> None:
        """Start every address afresh (without summaries)."""
        with self._lock:
            self._windows.clear()

    def _summarise(self, address: str, window: _Window) -> None:
        if window.suppressed:
            self._log.warning("%s: %d more protocol errors in the last %d s, not logged one "
                              "by one", address, window.suppressed, int(self._window))


PROTOCOL_LOG = ProtocolLog()  # one per process: the gate, push_scp and pynetdicom's path share it


class LibraryProtocolErrors(logging.Filter):
    """Attached to pynetdicom's loggers: its warnings and errors about a peer's PDUs become one
    line each without traceback, rate-limited per peer like ours (the peer is found from the
    association of the thread that logs: pynetdicom's DUL and association threads)."""

    def __init__(self, log: ProtocolLog = PROTOCOL_LOG) -> None:
        super().__init__()
        self._log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        address = _peer_of_current_thread()
        if address is None:
            return True
        self._log.warning(address, "%s", record.getMessage())
        return False


def _peer_of_current_thread() -> str | None:
    thread: Any = threading.current_thread()
    assoc = getattr(thread, "assoc", thread)  # a DUL thread has .assoc; an Association is one
    try:
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return str(peer.address) if peer.address_info is not None else None
    except AttributeError:
        return None


def quiet_library_errors(prefix: str = "pynetdicom") -> None:
    """Attach :class:`LibraryProtocolErrors` to every logger under ``prefix`` (idempotent)."""
    names = [name for name in logging.root.manager.loggerDict
             if name == prefix or name.startswith(prefix + ".")]
    for name in names:
        logger_ = logging.getLogger(name)
        if not any(isinstance(f, LibraryProtocolErrors) for f in logger_.filters):
            logger_.addFilter(LibraryProtocolErrors())
