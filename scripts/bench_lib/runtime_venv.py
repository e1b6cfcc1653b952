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
