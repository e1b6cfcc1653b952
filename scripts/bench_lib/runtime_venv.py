"""The router the benchmark measures runs from a virtual environment with its runtime
dependencies only, as a deployment has them (``pip install .``), not from the test
environment: pydicom imports optional packages it finds (requests, for one, which only the
test tools pull in), and every receiver process would pay their memory. Its versions are the
ones constraints.txt pins, as in the test environment (scripts/lock makes that file).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = "constraints.txt"


def _digest(project: Path, constraints: Path) -> str:
    """What a venv of ``project`` is stamped with (as scripts/test and scripts/run do)."""
    data = (project / "pyproject.toml").read_bytes() + constraints.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _build(venv: Path, project: Path, constraints: Path) -> Path:
    """``venv`` with an editable install of ``project`` and its runtime dependencies at the
    versions ``constraints`` pins, (re)built when missing or when the project's pyproject.toml
    or the constraints changed; returns its python."""
    stamp = venv / f".installed-{_digest(project, constraints)}"
    if not stamp.exists():
        print(f"building the router's runtime environment in {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints)]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*pip, "--build-constraint", str(constraints), "-e", str(project)],
                       check=True)
        stamp.touch()
    return venv / "bin" / "python"


def runtime_router(cache_dir: Path) -> Path:
    """The dicom-router console script of ``<cache_dir>/router-venv`` (an editable install of
    this checkout, so code changes need no rebuild; dependency changes do, by the stamp)."""
    python = _build(cache_dir.resolve() / "router-venv", REPO, REPO / CONSTRAINTS)
    return python.parent / "dicom-router"


def commit_router(cache_dir: Path, revision: str) -> Path:
    """A console script that runs ``revision``'s router code: a git worktree of it in
    ``<cache_dir>/compare/<sha>`` and a wrapper beside it.

    Its packages are what ``revision``'s pyproject.toml asks for, at the versions of its own
    constraints.txt (this checkout's for a revision older than that file): the runtime venv's
    when both files match this checkout's, else those of a venv of its own beside the worktree
    (``<sha>.venv``, an editable install of the worktree, built once).

    A venv may hold an editable install of this checkout, and a child's current directory
    comes first on ``sys.path``; the wrapper sets ``PYTHONSAFEPATH`` (no current directory)
    and puts the worktree on ``PYTHONPATH`` ahead of any editable finder. The receiver
    processes inherit both. It refuses to return a wrapper that would import this checkout's
    code instead.
    """
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        check=True, capture_output=True, text=True).stdout.strip()
    tree = cache_dir.resolve() / "compare" / sha[:12]
    if not (tree / "router").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree),
                        sha], check=True, stdout=subprocess.DEVNULL)
    if (tree / CONSTRAINTS).is_file():
        constraints, pins = tree / CONSTRAINTS, "its constraints.txt"
    else:
        constraints, pins = REPO / CONSTRAINTS, "this checkout's constraints.txt"
    if _digest(tree, constraints) == _digest(REPO, REPO / CONSTRAINTS):
        python = runtime_router(cache_dir).parent / "python"
        packages = "the runtime venv's packages"
    else:
        python = _build(tree.parent / f"{sha[:12]}.venv", tree, constraints)
        packages = f"its own venv ({pins})"
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
    print(f"router-b: {revision} ({sha[:12]}) from {tree}, with {packages}", flush=True)
    return wrapper
