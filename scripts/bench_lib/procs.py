"""Child processes of the bench: each in its own process group, all stopped on exit; readiness
probes (TCP port, HTTP, DICOM echo) and peak-memory sampling of a process tree.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# DCMTK 3.6.7 disables Nagle only when this is in its environment (ARCHITECTURE.md section 7).
DCMTK_ENV = {"TCP_NODELAY": "1"}


class ChildFailed(RuntimeError):
    """A child process exited or did not become ready."""


@dataclass
class Child:
    """A started process, leader of its own process group, logging to ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_LIVE: dict[int, Child] = {}


def spawn(
    name: str, argv: Sequence[str | Path], log: Path, env: Mapping[str, str] | None = None
) -> Child:
    """Start ``argv`` in a new session (to signal its whole tree), output going to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    child = Child(name, popen, log)
    _LIVE[child.pid] = child
    return child


def stop(child: Child, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    _signal_group(child, signal.SIGTERM)
    try:
        child.popen.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(child, signal.SIGKILL)
        child.popen.wait()
    _signal_group(child, signal.SIGKILL)  # forked helpers that outlived their leader
    _LIVE.pop(child.pid, None)


def stop_all() -> None:
    """Stop every child still running; called on exit, failure and Ctrl-C."""
    for child in list(_LIVE.values()):
        stop(child, grace=3.0)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C does, so ``finally`` blocks stop children."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def _signal_group(child: Child, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000  # below: registered services (PostgreSQL's 5432, Orthanc's 4242, ...)
_HANDED_OUT: set[int] = set()  # every port free_port returned: never twice in one bench


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (first, last), inclusive."""
    try:
        first, last = path.read_text().split()
        return int(first), int(last)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_candidates(ephemeral: tuple[int, int]) -> list[int]:
    """Ports for listening that outgoing connections never take: from 10000 up, outside
    ``ephemeral``. A port picked inside it could be taken by any connect() (the bench's own
    senders, other users' tests) between the check and the receiver's bind."""
    first, last = ephemeral
    return [p for p in range(_LOWEST_PORT, 65536) if not first <= p <= last]


def port_is_free(port: int) -> bool:
    """True when nothing holds ``port`` on 127.0.0.1: a plain bind (no SO_REUSEADDR, so a
    port with connections in TIME_WAIT counts as taken too)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(ephemeral: tuple[int, int] | None = None, attempts: int = 200) -> int:
    """A TCP port outside the ephemeral range that was free on 127.0.0.1 a moment ago and
    that this process has not handed out before."""
    candidates = port_candidates(ephemeral or ephemeral_range())
    for _ in range(attempts if candidates else 0):
        port = random.choice(candidates)
        if port not in _HANDED_OUT and port_is_free(port):
            _HANDED_OUT.add(port)
            return port
    raise ChildFailed(f"no free port outside the ephemeral range {ephemeral_range()}")


def wait_until(
    ready: Callable[[], bool], timeout: float, child: Child, what: str, interval: float = 0.1
) -> None:
    """Poll ``ready`` until it is true; fail early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            failure = f"{child.name} exited ({child.popen.returncode}) before {what}"
        elif time.monotonic() > deadline:
            failure = f"{child.name}: no {what} within {timeout:.0f} s"
        else:
            time.sleep(interval)
            continue
        raise ChildFailed(f"{failure}\n--- {child.name} log (tail) ---\n{child.log_tail()}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), b""
    except (OSError, ValueError):
        return 0, b""


def dicom_echo(port: int, called_ae: str) -> bool:
    """True when a C-ECHO to 127.0.0.1:port succeeds (DCMTK ``echoscu``)."""
    argv = ["echoscu", "-to", "2", "-ta", "2", "-aet", "BENCH", "-aec", called_ae]
    result = subprocess.run(
        [*argv, "127.0.0.1", str(port)],
        env={**os.environ, **DCMTK_ENV},
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@dataclass
class RssSampler:
    """Samples VmRSS of a process and all its descendants every ``interval`` seconds.

    ``peak_sum`` is the largest sum over the tree at one sample; ``hwm_sum`` adds each process's
    own peak (VmHWM, last seen): exact for one process, an upper bound for several.
    """

    root: int
    interval: float = 0.05
    more_roots: tuple[int, ...] = ()  # further trees summed with root's (several nodes)
    peak_sum: int = 0
    hwm: dict[int, int] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)  # user+system seconds, last seen
    commands: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()

    @property
    def hwm_sum(self) -> int:
        return sum(self.hwm.values())

    @property
    def cpu_sum(self) -> float:
        """CPU seconds of the whole tree (each process as last sampled, at most 50 ms old
        for one that exited): steadier than wall time on a busy machine."""
        return sum(self.cpu.values())

    def sample_cpu(self) -> float:
        """Sample now; the tree's CPU seconds so far."""
        self._sample()
        return self.cpu_sum

    def by_process(self) -> dict[str, int]:
        """VmHWM of each process seen, keyed "<pid> <command line, shortened>"."""
        return {f"{pid} {self.commands.get(pid, '?')}": hwm for pid, hwm in self.hwm.items()}

    def cpu_by_process(self, since: dict[int, float]) -> dict[str, float]:
        """CPU seconds of each process since ``since`` (a copy of ``cpu`` taken earlier)."""
        return {f"{pid} {self.commands.get(pid, '?')}": round(cpu - since.get(pid, 0.0), 3)
                for pid, cpu in self.cpu.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        total = 0
        for pid in [p for r in (self.root, *self.more_roots) for p in process_tree(r)]:
            rss, hwm = _memory_of(pid)
            total += rss
            cpu = cpu_of(pid)
            if cpu:
                self.cpu[pid] = cpu
            if hwm:
                self.hwm[pid] = hwm
                if pid not in self.commands:
                    self.commands[pid] = _command_of(pid)
        self.peak_sum = max(self.peak_sum, total)


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from /proc/<pid>/task/<tid>/children."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pending.extend(int(c) for c in children.read().split())
        except OSError:
            continue
    return found


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "(exited)"


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` (0.0 for a process that is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; zeros for a process that is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm
