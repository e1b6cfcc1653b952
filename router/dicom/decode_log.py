"""Quiet handled pixel decode failures: pydicom's pixel decoders (and encoders) log every
plugin's failure with its full traceback at ERROR before they raise. Where the router handles
that failure on purpose (a frame it cannot render, an instance it cannot decompress for a
peer) and logs one line of its own, those records are dropped; everywhere else, and for any
other logger, tracebacks stay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CODER_LOGGERS = ("pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base")

_state = threading.local()
_installed = threading.Lock()


class _HandledHere(logging.Filter):
    """Drops the coders' records while this thread is inside :func:`handled_decode`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_state, "depth", 0)


_FILTER = _HandledHere()


def _install() -> None:
    with _installed:
        for name in CODER_LOGGERS:
            log = logging.getLogger(name)
            if _FILTER not in log.filters:
                log.addFilter(_FILTER)


@contextmanager
def handled_decode() -> Iterator[None]:
    """Decode or encode pixel data whose failure the caller logs in one line itself."""
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
