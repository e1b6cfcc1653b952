"""The temp file a C-STORE dataset streams into: hashed while written, buffered, and never
raising into pynetdicom's reader thread (a full disk becomes a status, not a dropped link).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

# A large object's write-back is started every this many bytes while it arrives, so that the
# fsync before its answer has only the tail left to write (10 MB radiographs: the fsync was
# most of the time between the last byte and the answer). 1, 2 and 8 MB measured no better.
EARLY_SYNC_BYTES = 4 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of dirty pages, do not wait


def _writeback_starter() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), or None where libc has no such call."""
    try:
        call = ctypes.CDLL(None).sync_file_range  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _writeback_starter()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk, without waiting.

    Only a head start for the fsync that follows: it reports no error (that fsync does, as
    the kernel keeps write-back errors for the descriptor until it is synced) and does
    nothing where sync_file_range is missing. It replaced an fsync on a thread pool: handing
    each file to a pool thread and back cost more CPU than it saved here (ct4 receive about
    +10%, dx +10-15%; docs/benchmarks.md, seventh session). ctypes releases the GIL.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _NoFlush:
    """pynetdicom calls ``file.flush()`` after every fragment; we flush once, at the end."""

    def flush(self) -> None:
        return None


class SpoolFile:
    """A write-only file in the spool folder with a running SHA-256 and a remembered error."""

    def __init__(self, folder: Path) -> None:
        self.name = str(folder / f"{uuid.uuid4().hex}.part")
        self.file = _NoFlush()
        self.size = 0
        self.error: OSError | None = None
        self._hash = hashlib.sha256()
        # pynetdicom writes whole PDVs (up to the PDU size), so a small buffer is enough.
        # Readable too: the receipt reads the header back through this descriptor (reader()),
        # not by opening the file again.
        self._fh = open(self.name, "x+b", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._unsynced = 0  # bytes written whose write-back has not been started
        self._durable = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self.error is None:
            try:
                self._fh.write(data)
                self._unsynced += len(data)
                if self._unsynced >= EARLY_SYNC_BYTES:
                    self._fh.flush()
                    self._start_writeback()
            except OSError as exc:  # ENOSPC, EIO...: remembered, reported by the handler
                self.error = exc
        return len(data)

    def _start_writeback(self) -> None:
        start_writeback(self._fh.fileno(), self.size - self._unsynced, self._unsynced)
        self._unsynced = 0

    def finish(self) -> str:
        """Flush to the OS and start the write-back of what is left; return the SHA-256.

        Raises the remembered write error. :meth:`wait_durable` must be called (and must not
        raise) before anything refers to this file as stored.
        """
        if self.error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        # The disk writes (about 1 ms for 0.5 MB here) overlap parsing and routing; the
        # fsync in wait_durable then mostly waits for them.
        self._start_writeback()
        return self._hash.hexdigest()

    def wait_durable(self) -> None:
        """Block until the data is on disk (fsync); raises the fsync's OSError."""
        if not self._durable:
            os.fsync(self._fh.fileno())
            self._durable = True

    def reader(self) -> PositionalReader:
        """A read-only view of the finished file (after :meth:`finish`) on this descriptor."""
        return PositionalReader(self._fh.fileno())

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError as exc:
            self.error = self.error or exc

    @property
    def path(self) -> Path:
        return Path(self.name)


class PositionalReader:
    """Reads a descriptor by position (os.pread), as a minimal binary file: opening the file
    again costs a path lookup, and 0.1-0.3 ms here when the journal is busy with fsyncs.
    It never closes the descriptor (its SpoolFile does)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0

    def fileno(self) -> int:
        return self._fd

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(os.fstat(self._fd).st_size - self._pos, 0)
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += os.fstat(self._fd).st_size
        self._pos = offset
        return self._pos

    def tell(self) -> int:
        return self._pos
