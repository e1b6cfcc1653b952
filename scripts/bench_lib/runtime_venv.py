"""The router the benchmark measures runs from a virtual environment with its runtime
dependencies only, as a deployment has them (``pip install .``), not from the test
environment: pydicom imports optional packages it finds (requests, for one, which only the
test tools pull in), and every receiver process would pay their memory.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def runtime_router(cache_dir: Path) -> Path:
    """The dicom-router console script of ``<cache_dir>/router-venv`` (built when missing or
    when pyproject.toml changed; an editable install, so code changes need no rebuild)."""
    venv = cache_dir.resolve() / "router-venv"
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = venv / f".installed-{digest}"
    if not stamp.exists():
        print(f"building the router's runtime environment in {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*pip, "-e", str(REPO)], check=True)
        stamp.touch()
    return venv / "bin" / "dicom-router"


def commit_router(cache_dir: Path, revision: str) -> Path:
    """A console script that runs ``revision``'s router code with the runtime venv's
    packages: a git worktree of it in ``<cache_dir>/compare/<sha>`` and a wrapper beside it.

    The runtime venv holds an editable install of this checkout, and a child's current
    directory comes first on ``sys.path``; the wrapper sets ``PYTHONSAFEPATH`` (no current
    directory) and puts the worktree on ``PYTHONPATH`` ahead of the editable finder. The
    receiver processes inherit both. It refuses to return a wrapper that would import this
    checkout's code instead.
    """
    router = runtime_router(cache_dir)
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        check=True, capture_output=True, text=True).stdout.strip()
    tree = cache_dir.resolve() / "compare" / sha[:12]
    if not (tree / "router").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree),
                        sha], check=True, stdout=subprocess.DEVNULL)
    python = router.parent / "python"
    wrapper = tree.parent / f"dicom-router-{sha[:12]}"
    wrapper.write_text(f"#!/bin/sh\nexport PYTHONSAFEPATH=1 PYTHONPATH={tree}\n"
                       f"exec {python} -m router.cli \"$@\"\n")
    wrapper.chmod(0o755)
    probe = subprocess.run(
        ["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={tree}", str(python), "-c",
         "import router; print(router.__file__)"],
        check=True, capture_output=True, text=True, cwd=REPO).stdout.strip()
    if not probe.startswith(str(tree)):
        raise RuntimeError(f"the wrapper for {revision} imports {probe}, not {tree}")
    print(f"router-b: {revision} ({sha[:12]}) from {tree}", flush=True)
    return wrapper
