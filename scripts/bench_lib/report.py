"""Medians over repeats, the results table, router ratios, PASS/FAIL targets and the JSON file.
MB means 10^6 bytes throughout.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .measure import Run, Skipped

RSS_LIMIT = 300 * 10**6  # bytes, for the "big" workload
# The router on each backend (cli.py names them); targets and ratios are checked for each,
# and "-b" builds (--compare) against them: router-b against router, router-b-pg against router-pg.
# With --blob-store s3 or --nodes, "-s3x<N>" follows: router-pg-s3x2 is two nodes.
ROUTERS = ("router", "router-pg")


def is_router(name: str) -> bool:
    """The router measured (any backend, blob store, node count), not a --compare build."""
    return name.startswith("router") and not name.startswith("router-b")


def build_b(router: str) -> str:
    """The --compare build's name beside ``router``."""
    return router.replace("router", "router-b", 1)


def _routers(summaries: list[Summary]) -> list[str]:
    """The routers whose targets are checked: one node on the local blob store, per backend
    (at least "router", so that its targets show as n/a). The S3 and several-node variants
    get ratios but no targets: the targets are for the router as most sites run it."""
    seen = {s.receiver for s in summaries}
    return [r for r in ROUTERS if r in seen] or ["router"]
# (workload, what the router is measured on, factor of Orthanc's receive rate it must reach)
RATE_TARGETS = [
    ("ct1", "receive", 0.8),
    ("ct4", "receive", 0.8),
    ("dx", "receive", 1.5),
    ("small", "receive", 0.5),
    *[(w, "end-to-end", 0.6) for w in ("ct1", "ct4", "dx", "small")],
]


@dataclass
class Summary:
    """One workload x receiver over its repeats; rates are instances/s, median [min, max]."""

    workload: str
    receiver: str
    repeats: int
    failed: int
    instances: int
    megabytes: float
    receive: tuple[float, float, float]
    deliver: tuple[float, float, float] | None
    peak_rss_mb: tuple[float, float, float]
    cpu_ms: tuple[float, float, float]  # receiver CPU per instance (receive and delivery)
    # median CPU ms per instance of shared servers (PostgreSQL backends, moto), when measured
    side_cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mb_per_instance(self) -> float:
        return self.megabytes / self.instances


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(runs: list[Run]) -> list[Summary]:
    """Median, min and max per workload x receiver, over the runs that succeeded."""
    keys = list(dict.fromkeys((r.workload, r.receiver) for r in runs))
    summaries = []
    for workload, receiver in keys:
        group = [r for r in runs if (r.workload, r.receiver) == (workload, receiver)]
        good = [r for r in group if r.ok] or group
        delivered = [r.instances / r.deliver_s for r in good if r.deliver_s]
        summaries.append(
            Summary(
                workload,
                receiver,
                len(group),
                sum(not r.ok for r in group),
                good[0].instances,
                good[0].bytes / 1e6,
                _spread([r.instances / r.receive_s for r in good]),
                _spread(delivered) if delivered else None,
                _spread([r.peak_rss / 1e6 for r in good]),
                _spread([r.cpu_s * 1000 / r.instances for r in good]),
                _side_medians(good),
            )
        )
    return summaries


def _side_medians(runs: list[Run]) -> dict[str, float]:
    names = list(dict.fromkeys(n for r in runs for n in r.cpu_side))
    return {
        n: statistics.median(r.cpu_side[n] * 1000 / r.instances for r in runs if n in r.cpu_side)
        for n in names
    }


def _find(summaries: list[Summary], workload: str, receiver: str) -> Summary | None:
    return next((s for s in summaries if (s.workload, s.receiver) == (workload, receiver)), None)


def ratios(summaries: list[Summary]) -> list[dict[str, object]]:
    """Each router's receive and end-to-end rates over Orthanc's and storescp's receive rates."""
    rows = []
    for router in (s for s in summaries if is_router(s.receiver)):
        row: dict[str, object] = {"workload": router.workload, "router": router.receiver}
        for other in ("orthanc", "storescp"):
            base = _find(summaries, router.workload, other)
            ref = base.receive[0] if base else None
            row[f"receive/{other}"] = router.receive[0] / ref if ref else None
            deliver = router.deliver[0] if router.deliver else None
            row[f"end-to-end/{other}"] = deliver / ref if ref and deliver else None
        rows.append(row)
    return rows


def comparison(summaries: list[Summary]) -> list[dict[str, object]]:
    """With --compare: per workload and backend, build B's medians over build A's."""
    rows = []
    for a in (s for s in summaries if is_router(s.receiver)):
        b = _find(summaries, a.workload, build_b(a.receiver))
        if b is None:
            continue
        rows.append({
            "workload": a.workload,
            "router": a.receiver,
            "receive B/A": b.receive[0] / a.receive[0],
            "end-to-end B/A": b.deliver[0] / a.deliver[0] if a.deliver and b.deliver else None,
            "CPU ms/inst A": a.cpu_ms[0],
            "CPU ms/inst B": b.cpu_ms[0],
            "peak RSS MB A": a.peak_rss_mb[0],
            "peak RSS MB B": b.peak_rss_mb[0],
        })
    return rows


def targets(summaries: list[Summary]) -> list[dict[str, object]]:
    """Each target, for each router measured, with the value and PASS, FAIL or n/a."""
    return [t for router in _routers(summaries) for t in _targets_of(summaries, router)]


def _targets_of(summaries: list[Summary], name: str) -> list[dict[str, object]]:
    results = []
    for workload, kind, factor in RATE_TARGETS:
        router = _find(summaries, workload, name)
        orthanc = _find(summaries, workload, "orthanc")
        value = None
        if router and orthanc:
            rate = router.receive[0] if kind == "receive" else (router.deliver or (0.0,))[0]
            value = rate / orthanc.receive[0]
        passed = value is not None and value >= factor
        label = f"{workload} {name} {kind} vs Orthanc receive"
        results.append(_verdict(label, value, f">= {factor:g}x", passed))
    big = _find(summaries, "big", name)
    rss = big.peak_rss_mb[0] if big else None
    results.append(
        _verdict(
            f"big: {name} peak RSS (MB)",
            rss,
            f"< {RSS_LIMIT / 1e6:g}",
            rss is not None and rss * 1e6 < RSS_LIMIT,
        )
    )
    return results


def _verdict(name: str, value: float | None, need: str, passed: bool) -> dict[str, object]:
    result = "n/a" if value is None else ("PASS" if passed else "FAIL")
    return {"target": name, "value": value, "required": need, "result": result}


def _fmt(spread: tuple[float, float, float] | None, digits: int | None = None) -> str:
    if spread is None:
        return "-"
    med, low, high = spread
    if digits is None:
        digits = 2 if med < 10 else 1
    return f"{med:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def print_report(summaries: list[Summary], skipped: list[Skipped], repeats: int) -> None:
    print(f"\nResults: median [min-max] of {repeats} run(s); MB = 10^6 bytes; inst = instances;"
          " CPU: the receiver's processes (all nodes'), + shared servers' where measured")
    head = (
        "workload",
        "receiver",
        "n",
        "MB",
        "receive inst/s",
        "MB/s",
        "end-to-end inst/s",
        "peak RSS MB",
        "CPU ms/inst",
    )
    print(
        f"{head[0]:<8} {head[1]:<15} {head[2]:>5} {head[3]:>7}  {head[4]:<24} {head[5]:>7}  "
        f"{head[6]:<24} {head[7]:<16} {head[8]}"
    )
    for s in summaries:
        mbs = s.receive[0] * s.mb_per_instance
        fail = f"  ({s.failed} failed)" if s.failed else ""
        print(
            f"{s.workload:<8} {s.receiver:<15} {s.instances:>5} {s.megabytes:>7.1f}  "
            f"{_fmt(s.receive):<24} {mbs:>7.1f}  {_fmt(s.deliver):<24} "
            f"{_fmt(s.peak_rss_mb, 0):<16} {_fmt(s.cpu_ms, 2)}{_side(s)}{fail}"
        )
    _print_ratios(ratios(summaries))
    _print_comparison(comparison(summaries))
    print("\nTargets (each router, medians):")
    for t in targets(summaries):
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['result']:<4}  {t['target']:<45} {value:>8}  (required {t['required']})")
    for skip in skipped:
        print(f"\nskipped: {skip.line()}")


def _side(s: Summary) -> str:
    """Shared servers CPU ms per instance (medians), as " + postgres 1.80 + moto 3.10"."""
    return "".join(f" + {name} {ms:.2f}" for name, ms in s.side_cpu_ms.items())


def _print_ratios(rows: list[dict[str, object]]) -> None:
    if not rows:
        print("\nRatios: no router results.")
        return
    cols = ["receive/orthanc", "receive/storescp", "end-to-end/orthanc", "end-to-end/storescp"]
    print("\nRatios (router rate / receiver's receive rate):")
    print(f"{'workload':<8} {'router':<15} " + " ".join(f"{c:>20}" for c in cols))
    for row in rows:
        cells = [f"{v:.2f}x" if isinstance(v, float) else "-" for v in (row[c] for c in cols)]
        print(f"{row['workload']!s:<8} {row['router']!s:<15} "
              + " ".join(f"{c:>20}" for c in cells))


def _print_comparison(rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    cols = ["receive B/A", "end-to-end B/A", "CPU ms/inst A", "CPU ms/inst B",
            "peak RSS MB A", "peak RSS MB B"]
    print("\nBuilds compared (B = --compare: router-b vs router, router-b-pg vs router-pg;"
          " medians):")
    print(f"{'workload':<8} {'A':<15} " + " ".join(f"{c:>15}" for c in cols))
    for row in rows:
        cells = []
        for col in cols:
            value = row[col]
            if not isinstance(value, float):
                cells.append("-")
            elif "B/A" in col:
                cells.append(f"{value:.2f}x")
            else:
                cells.append(f"{value:.{0 if 'RSS' in col else 2}f}")
        print(f"{row['workload']!s:<8} {row['router']!s:<15} "
              + " ".join(f"{c:>15}" for c in cells))


def write_json(
    path: Path, runs: list[Run], skipped: list[Skipped], meta: dict[str, object]
) -> None:
    summaries = summarize(runs)
    document = {
        **meta,
        "runs": [{**asdict(r), "peak_rss": r.peak_rss} for r in runs],
        "summary": [asdict(s) for s in summaries],
        "ratios": ratios(summaries),
        "comparison": comparison(summaries),
        "targets": targets(summaries),
        "skipped": [asdict(s) for s in skipped],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
