"""projections/ owns the read side and knows nothing of HTTP: no module in it imports the web
package or aiohttp, directly (any import statement, also inside a function) or through what it
imports. The web layer parses requests and calls the queries with typed arguments."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("web", "aiohttp", "aiohttp_jinja2", "jinja2")

CHILD = """
import importlib, json, pkgutil, sys

import projections

for info in pkgutil.walk_packages(projections.__path__, "projections."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_no_projections_module_imports_the_web_side() -> None:
    found = {}
    for path in sorted((ROOT / "projections").rglob("*.py")):
        bad = [name for name in _imported(ast.parse(path.read_text(), str(path)))
               if name.split(".")[0] in FORBIDDEN]
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_importing_every_projections_module_loads_no_web_module() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, timeout=120,
                         cwd=ROOT, check=True)
    modules = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert [name for name in modules if name.split(".")[0] in FORBIDDEN] == []
    assert "projections.jobs_queries" in modules
