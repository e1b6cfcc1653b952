"""scripts/stage-timing's timers: every stage it names still exists in the router (a rename
would silently drop it from the report), and a wrapped method is timed and still answers."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "scripts" / "bench_lib" / "stage_timing" / "sitecustomize.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stage_timing_site", SITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stage_names_a_method_that_exists() -> None:
    for module, cls, method, stage in _module().STAGES:
        owner = getattr(importlib.import_module(module), cls)
        assert callable(getattr(owner, method, None)), f"{stage}: {module}.{cls}.{method}"


def test_a_wrapped_method_is_timed_and_still_answers() -> None:
    site = _module()

    class Thing:
        def work(self, n: int) -> int:
            return n * 2

    site._wrap(Thing, "work", "work")
    assert Thing().work(21) == 42
    assert len(site._samples["work"]) == 1
    wall, cpu = site._samples["work"][0]
    assert wall >= 0 and cpu >= 0


def test_the_timings_are_written_at_exit(tmp_path: Path) -> None:
    # A process that installs the timers writes, at exit, a line per call of a timed stage
    # (one that raised included).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(SITE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m._install({str(tmp_path)!r})\n"
        "from router.storage.blobs import BlobStore\n"
        "import pathlib, tempfile\n"
        "try:\n"
        "    BlobStore(pathlib.Path(tempfile.mkdtemp())).commit('0' * 64, None)\n"
        "except Exception:\n"
        "    pass  # nothing staged: refused, and timed all the same\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    written = list(tmp_path.glob("*.tsv"))
    assert len(written) == 1
    stage, wall, cpu = written[0].read_text().splitlines()[0].split("\t")
    assert stage == "blob commit" and float(wall) >= 0 and float(cpu) >= 0


def test_each_thread_s_cpu_and_wait_for_a_core_are_written_and_reported(
        tmp_path: Path) -> None:
    # A process that spins one named thread: its line gives the thread's CPU seconds, and the
    # run-queue wait (>= 0) in the wall column; the report prints both per thread name.
    code = (
        "import importlib.util, threading, time\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(SITE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m._install({str(tmp_path)!r})\n"
        "def spin():\n"
        "    end = time.thread_time() + 0.3\n"
        "    while time.thread_time() < end:\n"
        "        pass\n"
        "    m._read_threads()\n"  # read while it runs: once it ends, its last reading stays
        "t = threading.Thread(target=spin, name='spinner-7'); t.start(); t.join()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    (written,) = tmp_path.glob("*.tsv")
    lines = [line.split("\t") for line in written.read_text().splitlines()]
    spinner = [line for line in lines if line[0] == "thread:spinner-N"]
    assert spinner, lines
    wait, cpu = float(spinner[0][1]), float(spinner[0][2])
    assert cpu >= 0.2 and wait >= 0

    # The report reads that folder: a receive stage line makes the per-instance column.
    (tmp_path / "receiver-1.tsv").write_text("receive (all below)\t0.002\t0.001\n")
    report = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stage-timing"), "report"], check=True,
        cwd=REPO, timeout=60, capture_output=True, text=True,
        env={**os.environ, "STAGE_TIMING_DIR": str(tmp_path)}).stdout
    assert "waited for a core s" in report
    row = next(line for line in report.splitlines() if "spinner-N" in line)
    assert float(row.split()[2]) >= 0.2  # CPU s
