"""``scripts/abuse``: the DICOM front door under a hostile host, measured.

A fresh receiver (the router by default, routing everything to a DCMTK storescp sink; Orthanc
with ``--orthanc`` for reference) is started; a well-behaved sender on 127.0.0.2 makes a C-ECHO
association every 0.25 s and stores a small CT instance every 0.5 s throughout. After a quiet
warm-up, a hostile host on 127.0.0.3 (bench_lib/attacker.py, its own process) holds 1,000 silent
sockets, makes 40 connect-and-close a second and sends 2,000 malformed PDUs; then everything is
watched for a recovery period. Printed: the sender's echo latencies and refusals, its stores
acknowledged and delivered, RSS and threads of the receiver's processes (baseline, peak, end),
log lines and tracebacks; each target of issue 15 with PASS or FAIL.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import attacker, procs
from .receivers import ORTHANC, Orthanc, Router, StoreScp, count_files

GOOD, BAD = "127.0.0.2", "127.0.0.3"
MAX_ASSOCIATIONS = 32  # the router's default, which the thread target is stated against


def pick_port() -> int:
    """A free port below the ephemeral range, where outgoing connections never take it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in range(20000 + os.getpid() % 1000 * 7, low):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class Samples:
    """What the monitor and the well-behaved sender saw, with timestamps (monotonic)."""

    memory: list[tuple[float, int, int]] = field(default_factory=list)  # t, rss, threads
    echoes: list[tuple[float, float | None]] = field(default_factory=list)  # t, seconds|None
    stores: list[tuple[float, int | None]] = field(default_factory=list)  # t, status|None


def _tree_usage(root: int) -> tuple[int, int]:
    rss = threads = 0
    for pid in procs.process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
        except OSError:
            continue
    return rss, threads


def _monitor(root: int, samples: Samples, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        samples.memory.append((time.monotonic(), *_tree_usage(root)))


def _echo(port: int, ae_title: str) -> float | None:
    from pynetdicom import AE

    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, bind_address=(GOOD, 0))
    if not assoc.is_established:
        return None
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return time.monotonic() - started if ok else None


def _ct() -> object:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "ABUSE1", "ABUSE^TEST", "CT"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
    return ds


def _store(port: int, ae_title: str) -> int | None:
    from pynetdicom import AE

    dataset = _ct()
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, bind_address=(GOOD, 0))
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(dataset)
    assoc.release()
    return int(status.Status) if "Status" in status else None


def _sender(port: int, ae_title: str, samples: Samples, stop: threading.Event) -> None:
    """Echo every 0.25 s; store every second round (0.5 s)."""
    rounds = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            samples.echoes.append((started, _echo(port, ae_title)))
        except Exception:  # a refused or broken association is a measurement, not a crash
            samples.echoes.append((started, None))
        if rounds % 2 == 0:
            try:
                samples.stores.append((time.monotonic(), _store(port, ae_title)))
            except Exception:
                samples.stores.append((time.monotonic(), None))
        rounds += 1
        stop.wait(max(0.0, 0.25 - (time.monotonic() - started)))


class _Target:
    """The receiver under test, started fresh in ``workdir``."""

    def __init__(self, kind: str, command: Path, workdir: Path) -> None:
        self.kind, self.workdir = kind, workdir
        self.port, self.http_port = pick_port(), pick_port() + 1
        self.sink = StoreScp("SINK")
        self.child: procs.Child | None = None
        self.ae_title = "DICOMROUTER" if kind == "router" else "ORTHANC"
        self.command = command

    def start(self) -> None:
        if self.kind == "router":
            self.sink.start(self.workdir / "sink")
            config = self.workdir / "router.toml"
            config.write_text(Router.config(self.port, self.http_port, self.sink.port))
            self.child = procs.spawn("router", [self.command, "serve", "--config", config,
                                                "--data-dir", self.workdir / "data"],
                                     self.workdir / "router.log")
            url = f"http://127.0.0.1:{self.http_port}/readyz"
        else:
            import json

            config = self.workdir / "orthanc.json"
            config.write_text(json.dumps(Orthanc.config(self.workdir, self.port,
                                                        self.http_port)))
            self.child = procs.spawn("orthanc", [ORTHANC, config], self.workdir / "orthanc.log",
                                     procs.DCMTK_ENV)
            url = f"http://127.0.0.1:{self.http_port}/system"
        procs.wait_until(lambda: procs.http_get(url, 2)[0] == 200, 60, self.child, url)

    def delivered(self) -> int:
        if self.kind == "router":
            return count_files(self.sink.out)
        import json

        status, body = procs.http_get(f"http://127.0.0.1:{self.http_port}/statistics", 30)
        return int(json.loads(body)["CountInstances"]) if status == 200 else -1

    def log_lines(self) -> tuple[int, int]:
        name = "router.log" if self.kind == "router" else "orthanc.log"
        text = (self.workdir / name).read_text(errors="replace")
        return len(text.splitlines()), text.count("Traceback")

    def stop(self) -> None:
        if self.child is not None:
            procs.stop(self.child)
        self.sink.stop()


def run(kind: str, command: Path, warmup: float, duration: float, recovery: float,
        workroot: Path) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix=f"abuse-{kind}-", dir=workroot))
    target = _Target(kind, command, workdir)
    target.start()
    assert target.child is not None
    samples, stop = Samples(), threading.Event()
    threads = [threading.Thread(target=_monitor, args=(target.child.pid, samples, stop),
                                daemon=True),
               threading.Thread(target=_sender, args=(target.port, target.ae_title, samples,
                                                      stop), daemon=True)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(warmup)
        lines_before, _ = target.log_lines()
        attack_start = time.monotonic()
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            attack = attacker.Attack(BAD, target.port, duration)
            outcome = pool.apply(attacker.run, (attack,))
        attack_end = time.monotonic()
        lines_after, tracebacks = target.log_lines()
        time.sleep(recovery)
        stop.set()
        for thread in threads:
            thread.join(15)
        acknowledged = sum(1 for _, status in samples.stores if status == 0)
        deadline = time.monotonic() + 30
        while target.delivered() < acknowledged and time.monotonic() < deadline:
            time.sleep(0.5)
        delivered = target.delivered()
    finally:
        stop.set()
        target.stop()
    return _summary(samples, attack_start, attack_end, outcome, acknowledged, delivered,
                    lines_after - lines_before, tracebacks, recovery)


def _median_between(memory: list[tuple[float, int, int]], start: float, end: float,
                    column: int) -> float:
    values = [row[column] for row in memory if start <= row[0] <= end]
    return statistics.median(values) if values else float("nan")


def _summary(samples: Samples, start: float, end: float, outcome: dict[str, int],
             acknowledged: int, delivered: int, log_lines: int, tracebacks: int,
             recovery: float) -> dict[str, object]:
    memory = samples.memory
    base_rss = _median_between(memory, start - 5, start, 1)
    base_threads = _median_between(memory, start - 5, start, 2)
    during = [row for row in memory if start <= row[0] <= end + 1]
    echoes = [(t, s) for t, s in samples.echoes if start <= t <= end]
    latencies = sorted(s for _, s in echoes if s is not None)
    back_at = next((row[0] - end for row in memory if row[0] > end
                    and row[1] <= base_rss + 10 * 2**20 and row[2] <= base_threads + 2), None)
    end_rss = _median_between(memory, end + recovery - 5, end + recovery + 1, 1)
    end_threads = _median_between(memory, end + recovery - 5, end + recovery + 1, 2)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else -1

    return {
        "attack": outcome, "echoes": len(echoes),
        "echo_refused": sum(1 for _, s in echoes if s is None),
        "echo_p50": pct(0.5), "echo_p95": pct(0.95), "echo_p99": pct(0.99),
        "echo_max": latencies[-1] if latencies else -1,
        "stores": len(samples.stores), "acknowledged": acknowledged, "delivered": delivered,
        "rss_base_mb": base_rss / 2**20,
        "rss_peak_mb": max((row[1] for row in during), default=0) / 2**20,
        "rss_end_mb": end_rss / 2**20,
        "threads_base": base_threads, "threads_peak": max((row[2] for row in during), default=0),
        "threads_end": end_threads, "back_at_baseline_s": back_at,
        "log_lines": log_lines, "tracebacks": tracebacks,
    }


def verdicts(result: dict[str, object]) -> list[tuple[str, bool]]:
    r = result
    back = r["back_at_baseline_s"]
    return [
        ("every C-ECHO of the sender at another address answered", r["echo_refused"] == 0),
        ("C-ECHO association within 1 s (max)", 0 <= float(r["echo_max"]) <= 1.0),  # type: ignore[arg-type]
        ("every store acknowledged and delivered",
         r["acknowledged"] == r["stores"] == r["delivered"]),
        ("RSS peak <= baseline + 50 MB",
         float(r["rss_peak_mb"]) <= float(r["rss_base_mb"]) + 50),  # type: ignore[arg-type]
        (f"threads peak <= baseline + 2 x {MAX_ASSOCIATIONS}",
         float(r["threads_peak"]) <= float(r["threads_base"]) + 2 * MAX_ASSOCIATIONS),  # type: ignore[arg-type]
        ("back at baseline within 60 s", back is not None and float(back) <= 60),  # type: ignore[arg-type]
        ("no tracebacks in the log", r["tracebacks"] == 0),
    ]


def report(kind: str, result: dict[str, object]) -> bool:
    r = result
    print(f"\n== {kind}")
    print(f"attacker (127.0.0.3): {r['attack']}")
    print(f"sender (127.0.0.2) during the attack: {r['echoes']} echo associations, "
          f"{r['echo_refused']} refused or failed; latency p50 {r['echo_p50']:.3f} s, "
          f"p95 {r['echo_p95']:.3f} s, p99 {r['echo_p99']:.3f} s, max {r['echo_max']:.3f} s")
    print(f"stores: {r['stores']} sent, {r['acknowledged']} acknowledged, "
          f"{r['delivered']} delivered")
    print(f"RSS (all processes): baseline {r['rss_base_mb']:.0f} MB, peak "
          f"{r['rss_peak_mb']:.0f} MB, after recovery {r['rss_end_mb']:.0f} MB")
    print(f"threads: baseline {r['threads_base']:.0f}, peak {r['threads_peak']}, after "
          f"recovery {r['threads_end']:.0f}; back at baseline after "
          f"{r['back_at_baseline_s'] if r['back_at_baseline_s'] is not None else 'never'} s")
    print(f"log: {r['log_lines']} lines during the attack, {r['tracebacks']} tracebacks")
    passed = True
    for what, ok in verdicts(result):
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
        passed &= ok
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/abuse", description=__doc__)
    parser.add_argument("--orthanc", action="store_true", help="also run Orthanc, for reference")
    parser.add_argument("--duration", type=float, default=60.0, help="attack seconds (60)")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--recovery", type=float, default=60.0)
    parser.add_argument("--command", type=Path,
                        default=Path(__file__).resolve().parents[2] / ".venv/bin/dicom-router",
                        help="the router's console script (default: .venv's)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    procs.install_signal_handlers()
    passed = True
    try:
        for kind in ["router", *(["orthanc"] if args.orthanc else [])]:
            result = run(kind, args.command, args.warmup, args.duration, args.recovery,
                         args.work_dir)
            ok = report(kind, result)
            passed &= ok or kind != "router"
    finally:
        procs.stop_all()
    sys.stdout.flush()
    return 0 if passed else 1
