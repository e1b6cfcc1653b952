"""One measurement (fresh receiver, send a workload, wait for delivery, sample memory) and the
loop over workloads x repeats x receivers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ChildFailed, RssSampler
from .receivers import Receiver, Unavailable, port_clash
from .workloads import Sent, Workload, data_size, send

POLL = 0.05  # seconds between checks of the sink folder
START_ATTEMPTS = 3  # starts of one receiver for one run, when a port was taken at the first


@dataclass
class Skipped:
    """A receiver not measured: one run (``repeat``), or from ``workload`` on (``repeat``
    None: it cannot run here)."""

    receiver: str
    workload: str
    repeat: int | None
    reason: str

    def line(self) -> str:
        which = "from then on" if self.repeat is None else f"#{self.repeat}"
        return f"{self.receiver} {self.workload} {which}: {self.reason.splitlines()[0]}"


@dataclass
class Run:
    """The outcome of sending one workload once to one freshly started receiver."""

    receiver: str
    workload: str
    repeat: int
    instances: int
    bytes: int
    receive_s: float
    deliver_s: float | None = None
    rss_sampled: int = 0  # highest sum of VmRSS over the process tree, sampled every 50 ms
    rss_hwm_sum: int = 0  # sum of each process's VmHWM: exact for 1 process, upper bound else
    rss_by_process: dict[str, int] = field(default_factory=dict)  # VmHWM per "<pid> <cmd>"
    cpu_s: float = 0.0  # CPU seconds of the receiver's process tree (without a router's sink)
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # same, per "<pid> <cmd>"
    # CPU seconds of servers the receiver shares (PostgreSQL backends of its database, moto)
    cpu_side: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def peak_rss(self) -> int:
        return max(self.rss_sampled, self.rss_hwm_sum)


def measure(
    receiver: Receiver, workload: Workload, files: list[Path], repeat: int, workdir: Path
) -> Run:
    """Start ``receiver`` in ``workdir``, send ``files``, check arrival; always clean up."""
    workdir.mkdir(parents=True)
    try:
        start(receiver, workdir)
        first, *more = receiver.pids
        sampler = RssSampler(first, more_roots=tuple(more)).start()
        cpu_at_start = sampler.sample_cpu()  # start-up (imports, recovery) is not counted
        cpu_each_at_start = dict(sampler.cpu)
        side_at_start = receiver.side_cpu()
        try:
            sent = send(files, receiver.ports, receiver.ae_title, workload.associations, workdir)
            deliver_s = _wait_delivered(receiver, len(files), sent) if receiver.forwards else None
        finally:
            sampler.stop()
        side = _side_cpu(side_at_start, receiver.side_cpu())
        run = Run(
            receiver.name,
            workload.name,
            repeat,
            len(files),
            data_size(files),
            sent.seconds,
            deliver_s,
            sampler.peak_sum,
            sampler.hwm_sum,
            sampler.by_process(),
            sampler.cpu_sum - cpu_at_start,
            sampler.cpu_by_process(cpu_each_at_start),
            side,
            notes=sent.failures,
        )
        _check_arrival(run, receiver)
        if not run.ok and receiver.child is not None:
            run.notes.append(f"{receiver.name} log (tail):\n{receiver.child.log_tail()}")
        return run
    finally:
        receiver.stop()
        _empty_files(workdir)


def _side_cpu(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds each shared server spent between two samples (processes that appeared in
    between count from zero)."""
    return {
        name: round(sum(cpu - before.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items()), 3)
        for name, pids in after.items()
    }


def start(receiver: Receiver, workdir: Path, attempts: int = START_ATTEMPTS) -> None:
    """Start ``receiver`` in ``workdir``; when a port it was given turned out taken (another
    program bound it after our check), start it again with new ports, in a fresh subfolder,
    up to ``attempts`` times in all. Other failures are raised at once."""
    for attempt in range(1, attempts + 1):
        folder = workdir if attempt == 1 else workdir / f"attempt-{attempt}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            receiver.start(folder)
            return
        except ChildFailed as error:
            receiver.stop()
            if not port_clash(error):
                raise
            if attempt == attempts:
                raise ChildFailed(f"a port was taken at each of {attempts} starts: "
                                  f"{error}") from error
            print(f"  {receiver.name}: a port was taken at start (attempt {attempt}); "
                  "starting again with other ports", flush=True)


def _empty_files(folder: Path) -> None:
    """Free what a run stored (disk space and page cache) but keep its files until the end of
    the bench (the caller's temporary folder goes then), as empty files.

    Deleting them made the next run slow on these machines: on ext4 without a journal,
    allocating an inode skips, one by one, every inode of the block group deleted in the last
    minute, and the next run's folder was placed in the group just emptied (perf: 10-40% of
    the receivers' CPU in recently_deleted and find_get_block_common). Keeping their data
    instead made every receiver slow once the page cache had to grow into memory the VM had
    not touched yet (storescp: 26 instead of 3.4 ms of CPU per 10 MB instance).
    """
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                os.truncate(path, 0)


def _wait_delivered(receiver: Receiver, expected: int, sent: Sent) -> float | None:
    """Seconds from the start of sending until the sink holds ``expected`` instances."""
    deadline = time.monotonic() + max(60.0, 10 * sent.seconds)
    while time.monotonic() < deadline:
        if receiver.delivered() >= expected:
            return time.monotonic() - sent.started
        time.sleep(POLL)
    return None


def _check_arrival(run: Run, receiver: Receiver) -> None:
    received = receiver.received()
    if received is not None and received != run.instances:
        run.notes.append(f"{receiver.name} holds {received} of {run.instances} instances")
    if receiver.forwards and run.deliver_s is None:
        run.notes.append(f"sink holds {receiver.delivered()} of {run.instances} after timeout")
    run.ok = not run.notes


def run_all(
    receivers: dict[str, Callable[[], Receiver]],
    plan: list[tuple[Workload, list[Path]]],
    repeats: int,
    tmp_root: Path,
) -> tuple[list[Run], list[Skipped]]:
    """Every workload ``repeats`` times; receivers interleaved so machine noise hits them all.
    A run whose receiver did not start is skipped, with the reason; a receiver that cannot run
    here (not installed, no database server) is skipped from then on.
    """
    runs: list[Run] = []
    skipped: list[Skipped] = []
    gone: set[str] = set()
    for workload, files in plan:
        print(f"\n{workload.name}: {workload.title} ({len(files)} files)", flush=True)
        for repeat in range(1, repeats + 1):
            for name, make in receivers.items():
                if name in gone:
                    continue
                workdir = tmp_root / f"{workload.name}-{name}-{repeat}"
                try:
                    run = measure(make(), workload, files, repeat, workdir)
                except Unavailable as error:
                    gone.add(name)
                    skipped.append(Skipped(name, workload.name, None, str(error)))
                    print(f"  {name}: SKIPPED from now on: {error}", flush=True)
                    continue
                except ChildFailed as error:
                    skipped.append(Skipped(name, workload.name, repeat, str(error)))
                    print(f"  {name} #{repeat}: SKIPPED (did not start): {error}", flush=True)
                    continue
                runs.append(run)
                print(progress_line(run), flush=True)
    return runs, skipped


def outcome(runs: list[Run], skipped: list[Skipped]) -> str | None:
    """One line naming every failed and skipped run, or None when all ran and succeeded."""
    failed = [f"{r.receiver} {r.workload} #{r.repeat} ({r.notes[0].splitlines()[0]})"
              for r in runs if not r.ok]
    parts = []
    if failed:
        parts.append(f"{len(failed)} run(s) failed: " + "; ".join(failed))
    if skipped:
        parts.append(f"{len(skipped)} skipped: " + "; ".join(s.line() for s in skipped))
    return "INCOMPLETE: " + " | ".join(parts) if parts else None


def progress_line(run: Run) -> str:
    rate = run.instances / run.receive_s
    line = (
        f"  {run.receiver:<15} #{run.repeat}: {run.receive_s:7.2f} s  {rate:8.1f} inst/s  "
        f"{run.bytes / 1e6 / run.receive_s:7.1f} MB/s  peak RSS {run.peak_rss / 1e6:7.1f} MB"
    )
    if len(run.rss_by_process) > 1:
        line += f" (sum over {len(run.rss_by_process)} processes)"
    line += f"  CPU {run.cpu_s * 1000 / run.instances:.2f} ms/inst"
    if run.deliver_s is not None:
        line += f"  delivered in {run.deliver_s:.2f} s"
    for name, seconds in run.cpu_side.items():
        line += f"  {name} {seconds * 1000 / run.instances:.2f} ms/inst"
    return line + ("" if run.ok else "  FAILED: " + "; ".join(run.notes))
