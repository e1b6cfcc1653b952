"""Per-stage timing of the router's receive and save paths, for ``scripts/stage-timing``.

Imported by every Python process started with this folder on PYTHONPATH. When
STAGE_TIMING_DIR is set, it wraps the methods in STAGES with a timer (wall and thread CPU
time of each call) and, at exit, writes one line per stage to STAGE_TIMING_DIR/<pid>.tsv.
It also notes the CPU time of each thread by name and how long it waited for a core (Linux's
/proc/self/task, read every 0.2 s, so a thread that ended keeps its last reading), written
beside as "thread:" lines.
A diagnostic aid only: the wrappers cost a few microseconds per call, and nothing of the
router imports this module.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import re
import threading
import time
from collections import defaultdict
from typing import Any

# (module, class, method, stage name): the C-STORE path in order, then the saves.
STAGES = (
    ("router.dicom.push_scp", "PushAssociation", "_read_pdu", "read PDU (incl. waiting)"),
    ("router.dicom.push_scp", "PushAssociation", "_on_stored", "after last PDU to answer"),
    ("router.dicom.spool", "SpoolFile", "finish", "spool finish (hash, write-back start)"),
    ("router.application.receive", "Receiver", "receive", "receive (all below)"),
    ("router.application.receive", "Receiver", "_admit", "admit (header scan, checks)"),
    ("router.application.receive", "Receiver", "_route", "route (rules)"),
    ("router.storage.blobs", "BlobStore", "stage", "blob stage"),
    ("router.dicom.spool", "SpoolFile", "wait_durable", "blob fsync wait"),
    ("eventsourcing.application", "Application", "save", "log save (all below)"),
    ("router.application.pg_recorder", "FlushOutsideLockRecorder", "_call",
     "PostgreSQL save call (insert, flush)"),
    ("router.application.pg_recorder", "FlushOutsideLockRecorder", "_flush_wal",
     "PostgreSQL WAL flush on its own"),
    ("router.storage.blobs", "BlobStore", "commit", "blob commit"),
    ("router.dicom.push_scp", "PushAssociation", "_respond", "send the answer"),
)

_samples: dict[str, list[tuple[float, float]]] = defaultdict(list)


def _wrap(cls: Any, method: str, stage: str) -> None:
    original = getattr(cls, method)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            _samples[stage].append((time.perf_counter() - wall, time.thread_time() - cpu))

    setattr(cls, method, timed)


_thread_cpu: dict[int, float] = {}  # native thread id -> CPU seconds at the last reading
# native thread id -> seconds it was runnable but waited for a core (the kernel's run-queue
# delay, /proc/self/task/<id>/schedstat): how long a thread starved, not how long it worked.
_thread_wait: dict[int, float] = {}
_thread_names: dict[int, str] = {}


def _read_threads() -> None:
    for thread in threading.enumerate():
        if thread.native_id is not None:
            _thread_names[thread.native_id] = re.sub(r"\d+", "N", thread.name)
    ticks = os.sysconf("SC_CLK_TCK")
    # Not bench_lib.procs.cpu_of: /proc/<id>/stat of a thread id gives its whole process's
    # CPU; a thread's own is under /proc/self/task/<id>/stat.
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        _thread_cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                _thread_wait[int(tid)] = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass  # the thread ended, or a kernel without schedstats


def _sample_threads() -> None:
    while True:
        _read_threads()
        time.sleep(0.2)


def _by_thread_name() -> dict[str, tuple[float, float]]:
    """CPU seconds and run-queue wait seconds of the threads of each name, added up."""
    _read_threads()
    totals: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for tid, cpu in _thread_cpu.items():
        name = _thread_names.get(tid, "(not a Python thread)")
        total_cpu, total_wait = totals[name]
        totals[name] = (total_cpu + cpu, total_wait + _thread_wait.get(tid, 0.0))
    return totals


def _install(out: str) -> None:
    for module, cls, method, stage in STAGES:
        try:
            _wrap(getattr(importlib.import_module(module), cls), method, stage)
        except (ImportError, AttributeError):
            continue  # renamed since: that stage is not timed
    role = "receiver" if b"-m\0router.dicom.receivers" in _cmdline() else "supervisor"

    if os.path.isdir("/proc/self/task"):
        threading.Thread(target=_sample_threads, name="stage-timing", daemon=True).start()

    def write() -> None:
        threads = _by_thread_name() if os.path.isdir("/proc/self/task") else {}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{role}-{os.getpid()}.tsv"), "w") as f:
            for stage, values in _samples.items():
                for wall, cpu in values:
                    f.write(f"{stage}\t{wall:.6f}\t{cpu:.6f}\n")
            for name, (cpu, wait) in threads.items():  # the wait in the wall column
                f.write(f"thread:{name}\t{wait:.6f}\t{cpu:.6f}\n")

    atexit.register(write)


def _cmdline() -> bytes:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


_ROUTER = (b"dicom-router", b"router.dicom.receivers")  # the supervisor, a receiver

if os.environ.get("STAGE_TIMING_DIR") and any(name in _cmdline() for name in _ROUTER):
    _install(os.environ["STAGE_TIMING_DIR"])
