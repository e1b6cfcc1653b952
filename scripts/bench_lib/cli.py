"""Command line of ``scripts/bench``: parse options, prepare data, run, report."""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import pgdb, procs, report
from .cluster import Nodes
from .measure import outcome, run_all
from .receivers import MAX_PDU, Orthanc, Receiver, Router, StoreScp
from .runtime_venv import commit_router, runtime_router
from .workloads import Workload, dcmtk_version, ensure_data, storescu_argv, workloads

RECEIVERS = ("storescp", "orthanc", "router")
WORKLOADS = ("ct1", "ct4", "dx", "small", "big")
BACKENDS = {"sqlite": ("sqlite",), "postgres": ("postgres",), "both": ("sqlite", "postgres")}


def _csv(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Receive and end-to-end throughput of storescp, Orthanc and the router, "
        "driven by DCMTK storescu on 127.0.0.1.",
    )
    _add_selection_options(parser)
    _add_path_options(parser)
    parser.add_argument("--check", action="store_true", help="exit 2 if a target FAILs")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    _check_nodes(parser, args)
    if args.workloads is None:
        args.workloads = [w for w in WORKLOADS if not (args.quick and w == "big")]
    return args


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 50 CT, 5 DX of 2 MiB, 100 small, no 1 GiB, 1 repeat",
    )
    parser.add_argument(
        "--only",
        type=_csv(RECEIVERS),
        default=list(RECEIVERS),
        help="receivers, comma-separated (default: all)",
    )
    parser.add_argument(
        "--workloads",
        type=_csv(WORKLOADS),
        default=None,
        help=f"comma-separated from {','.join(WORKLOADS)} (default: all; --quick leaves out big)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=None,
        help="the router's event store: sqlite (default), postgres (a fresh database per"
        " router start, dropped after; reported as router-pg) or both, interleaved",
    )
    parser.add_argument(
        "--nodes",
        type=_node_counts,
        default=[1],
        help="router nodes per start, or several counts comma-separated (each its own"
        " receiver, interleaved): N > 1 runs N `serve` processes on one PostgreSQL database"
        " and one moto S3 store, reported as router-pg-s3xN; it implies --backend postgres"
        " and --blob-store s3 for every count of the run (default 1: one router)",
    )
    parser.add_argument(
        "--blob-store",
        choices=("local", "s3"),
        default=None,
        help="the router's blob store: local (default) or s3 (a fresh moto_server on"
        " 127.0.0.1 per start, stopped after; the name gets -s3x<nodes>)",
    )
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="admin URL the bench creates and drops its databases through (default:"
        f" ${pgdb.ADMIN_URL_ENV}, else {pgdb.DEFAULT_ADMIN_URL})",
    )


def _node_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("node counts from 1 up, comma-separated")
    return list(dict.fromkeys(counts))


def _check_nodes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Several nodes share PostgreSQL and S3: more than one implies both for the whole run
    (so that its 1-node figure is on the same stores), and contradicting them is an error."""
    if max(args.nodes) > 1:
        if args.backend not in (None, "postgres"):
            parser.error("--nodes above 1 runs on PostgreSQL: leave out --backend or say postgres")
        if args.blob_store not in (None, "s3"):
            parser.error("--nodes above 1 shares an S3 blob store: leave out --blob-store")
        args.backend, args.blob_store = "postgres", "s3"
    args.backend = args.backend or "sqlite"
    args.blob_store = args.blob_store or "local"


def _create_cost(folder: Path, count: int = 200) -> float:
    """Seconds to create (and close) one empty file in ``folder``: every receiver creates at
    least one file per instance, and on some machines this differs tenfold between folders."""
    with tempfile.TemporaryDirectory(prefix="create-cost-", dir=folder) as tmp:
        started = time.perf_counter()
        for n in range(count):
            os.close(os.open(os.path.join(tmp, str(n)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return (time.perf_counter() - started) / count


def _spread_subfolders(folder: Path) -> str:
    """Mark ``folder`` as a top of directory hierarchies for ext4's Orlov allocator (what
    ``chattr +T`` does), so that each run's folder is placed in a block group of its own, away
    from inodes deleted by earlier runs (why that matters: measure._empty_files). Returns what
    happened, for the report.
    """
    fs_ioc_getflags, fs_ioc_setflags, fs_topdir_fl = 0x80086601, 0x40086602, 0x00020000
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = bytearray(struct.pack("l", 0))
            fcntl.ioctl(fd, fs_ioc_getflags, flags)
            value = struct.unpack("l", flags)[0] | fs_topdir_fl
            fcntl.ioctl(fd, fs_ioc_setflags, struct.pack("l", value))
        finally:
            os.close(fd)
    except OSError as error:
        return f"not spread over block groups ({error.strerror})"
    return "each run's folder in a block group of its own (chattr +T)"


# A new run root tends to be placed in the block groups the last cleanup emptied (they hold
# the fewest folders), where creating files is slow for a while (measure._empty_files says
# why). The kernel skips inodes deleted in the last 60 s, or 6 min while their inode table
# block is dirty, which allocating next to them makes it again; 70 s after a cleanup perf
# still put 10% of a small-object run's samples in recently_deleted.
_DELETIONS_SETTLE_S = 6 * 60 + 10
_DELETIONS_MANY = 5000  # fewer (a --quick run deletes about 1,800) are not worth waiting for
_DELETIONS_STAMP = ".last-cleanup"


def _note_deletions(tmp_dir: Path, count: int) -> None:
    """Just before the run folders are deleted: remember when, and how many entries."""
    (tmp_dir / _DELETIONS_STAMP).write_text(f"{time.time()} {count}\n")


def _wait_for_old_deletions(tmp_dir: Path) -> None:
    """Wait until the last bench's deletions no longer slow down file creation here."""
    try:
        when, count = (tmp_dir / _DELETIONS_STAMP).read_text().split()
        deleted_at, deleted = float(when), int(count)
    except (OSError, ValueError):
        return
    if deleted < _DELETIONS_MANY:
        return
    wait = deleted_at + _DELETIONS_SETTLE_S - time.time()
    if wait > 0:
        print(f"waiting {wait:.0f} s for the previous bench's deleted files to age "
              "(see docs/benchmarks.md)", flush=True)
        time.sleep(wait)


def _add_path_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".bench-cache"),
        help="generated data, reused by later runs (default ./.bench-cache)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="where receivers store what they get (default: <cache-dir>/receivers, on the"
        " disk a deployment would use; see docs/benchmarks.md for why not the system temp)",
    )
    parser.add_argument(
        "--router-command",
        type=Path,
        default=None,
        help="the router's console script (default: one in <cache-dir>/router-venv with the"
        " runtime dependencies only, built on first use)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="a second router build's console script (or wrapper), run as router-b"
        " interleaved with the first, so machine drift hits both; the report adds B/A"
        " ratios (docs/benchmarks.md, 'Comparing two builds')",
    )
    parser.add_argument(
        "--compare-commit",
        metavar="REV",
        default=None,
        help="--compare with this git revision's router code (a worktree in"
        " <cache-dir>/compare and a wrapper that really imports it)",
    )


def _receivers(args: argparse.Namespace) -> dict[str, Callable[[], Receiver]]:
    """The receivers in the order each repeat runs them: the router once per backend, then
    the --compare build once per backend ("-pg" names the PostgreSQL one)."""
    chosen: dict[str, Callable[[], Receiver]] = {}
    if "storescp" in args.only:
        chosen["storescp"] = StoreScp
    if "orthanc" in args.only:
        chosen["orthanc"] = Orthanc
    builds = [("router", args.router_command)] if "router" in args.only else []
    if args.compare is not None:
        builds.append(("router-b", args.compare))
    postgres = pgdb.admin_url(args.postgres_url)
    for name, command in builds:
        for backend in BACKENDS[args.backend]:
            url = None if backend == "sqlite" else postgres
            label = name if backend == "sqlite" else f"{name}-pg"
            for nodes in args.nodes:
                if args.blob_store == "s3":
                    chosen[f"{label}-s3x{nodes}"] = _nodes(command, f"{label}-s3x{nodes}",
                                                           url, nodes)
                else:
                    chosen[label] = _router(command, label, url)
    return chosen


def _router(command: Path, name: str, postgres: str | None) -> Callable[[], Receiver]:
    return lambda: Router(command, name=name, postgres=postgres)


def _nodes(command: Path, name: str, postgres: str | None, nodes: int) -> Callable[[], Receiver]:
    return lambda: Nodes(command, name, postgres, nodes)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _meta(args: argparse.Namespace) -> dict[str, object]:
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_end": os.getloadavg(),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "dcmtk": dcmtk_version(),
        },
        "options": {
            "repeat": args.repeat,
            "quick": args.quick,
            "only": args.only,
            "workloads": args.workloads,
            "backend": args.backend,
            "nodes": args.nodes,
            "blob_store": args.blob_store,
            "compare": str(args.compare) if args.compare else None,
        },
        "commands": {
            "storescu": " ".join(storescu_argv("<port>", "<AE>", [Path("<files>")])),
            "storescp": " ".join(StoreScp.argv("STORESCP", "<dir>", "<port>")),
            "orthanc": Orthanc.config(Path("<tmp>"), 0, 0),
            "environment": {
                **procs.DCMTK_ENV,
                "router DICOM_ROUTER_* set": sorted(
                    k for k in os.environ if k.startswith("DICOM_ROUTER_")
                ),
            },
        },
    }


def _prepare(args: argparse.Namespace) -> list[tuple[Workload, list[Path]]]:
    """Each selected workload with its files, generating missing data first."""
    print(f"data cache: {args.cache_dir.resolve()}", flush=True)
    available = workloads(args.quick)
    return [
        (available[name], ensure_data(args.cache_dir, available[name].data))
        for name in args.workloads
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_handlers()
    print(
        f"storescu/storescp with TCP_NODELAY=1, receivers' max PDU {MAX_PDU}; repeat {args.repeat}"
        f"; load average {_load()}",
        flush=True,
    )
    if args.router_command is None and "router" in args.only:
        args.router_command = runtime_router(args.cache_dir)
    if args.compare_commit is not None:
        args.compare = commit_router(args.cache_dir, args.compare_commit)
    print(f"router: {args.router_command}", flush=True)
    if args.tmp_dir is None:
        args.tmp_dir = args.cache_dir / "receivers"
    args.tmp_dir.mkdir(parents=True, exist_ok=True)
    print(f"receivers store under {args.tmp_dir} (creating a file there: "
          f"{_create_cost(args.tmp_dir) * 1000:.3f} ms; in {tempfile.gettempdir()}: "
          f"{_create_cost(Path(tempfile.gettempdir())) * 1000:.3f} ms)", flush=True)
    try:
        plan = _prepare(args)
        _wait_for_old_deletions(args.tmp_dir)
        with tempfile.TemporaryDirectory(prefix="dicom-bench-", dir=args.tmp_dir) as tmp:
            print(f"run folders: {_spread_subfolders(Path(tmp))}", flush=True)
            try:
                runs, skipped = run_all(_receivers(args), plan, args.repeat, Path(tmp))
            finally:
                _note_deletions(args.tmp_dir, sum(1 for _ in Path(tmp).rglob("*")))
    except KeyboardInterrupt:
        print("\ninterrupted; children stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        _drop_databases()
    summaries = report.summarize(runs)
    report.print_report(summaries, skipped, args.repeat)
    print(f"\nload average at the end: {_load()} ({os.cpu_count()} CPUs)")
    if args.json:
        report.write_json(args.json, runs, skipped, _meta(args))
        print(f"\nwrote {args.json}")
    incomplete = outcome(runs, skipped)
    if incomplete:
        print(f"\n{incomplete}", file=sys.stderr)
        return 1
    failed_targets = any(t["result"] == "FAIL" for t in report.targets(summaries))
    return 2 if args.check and failed_targets else 0


def _drop_databases() -> None:
    """Drop the databases a failed or interrupted run left (each run drops its own)."""
    left = pgdb.drop_all()
    if left:
        print(f"could not drop PostgreSQL databases: {', '.join(left)}", file=sys.stderr)
