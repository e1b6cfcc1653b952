"""projections/ owns the read side and knows nothing of HTTP: no module in it imports the web
package or aiohttp, directly (any import statement, also inside a function) or through what it
imports. The web layer parses requests and calls the queries with typed arguments.

The other way round, no SQL over a view's tables outside projections/: router/ and web/ call
the query functions of projections/*_queries.py (see test_no_sql_over_views_outside_projections).
"""

from __future__ import annotations

import ast
import json
import re
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


# -- SQL over views outside projections/ ------------------------------------------------------

# A view table: every table a projections/ module creates (``CREATE TABLE [IF NOT EXISTS] t``),
# projection_positions included.
_CREATE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)")
# SQL naming a table: an upper-case keyword (as all our SQL is written) then the table name.
_NAMES_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(\w+)")
# The write side's own tables, not views, read and written where they belong: the cluster's
# node registry (router/cluster/nodes.py) and eventsourcing's logs (stored_events on SQLite,
# <application>_events on PostgreSQL; router/application/pg_recorder.py). Never scanned for;
# listed so that a view never takes one of their names.
WRITE_SIDE_TABLES = frozenset({"router_nodes", "stored_events", "ingest_events",
                               "delivery_events", "admin_events", "access_events"})
SCANNED = ("router", "web")


def view_tables() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "projections").rglob("*.py"):
        found.update(_CREATE.findall(path.read_text()))
    return found


def sql_over_views(source: str, tables: set[str]) -> list[tuple[int, str]]:
    """(line, table) of each string literal in ``source`` whose SQL names a view table after
    FROM, JOIN, INTO, UPDATE or TABLE (upper case). Adjacent literals are one constant to the
    parser, so a statement split over lines is seen whole; f-string parts are scanned as
    literals. A table name built at run time (``FROM {table}``) is not caught."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            hits += [(node.lineno, name) for name in _NAMES_TABLE.findall(node.value)
                     if name in tables]
    return hits


def test_the_scanner_finds_sql_over_a_view() -> None:
    source = ('Q = ("SELECT d.job_id FROM deliveries d"\n'
              '     " JOIN jobs j ON j.job_id = d.job_id")\n')
    assert sql_over_views(source, {"jobs", "deliveries"}) == [(1, "deliveries"), (1, "jobs")]
    assert sql_over_views('f"DELETE FROM audit WHERE x = {y}"', {"audit"}) == [(1, "audit")]
    assert sql_over_views('"SELECT 1 FROM router_nodes"', {"jobs"}) == []
    assert sql_over_views('"received from jobs of the study"', {"jobs"}) == []


def test_no_sql_over_views_outside_projections() -> None:
    tables = view_tables()
    assert {"jobs", "deliveries", "blob_purges", "audit", "studies", "instances",
            "ai_requests", "units", "storage_commitments", "projection_positions"} <= tables
    assert not tables & WRITE_SIDE_TABLES
    found = [f"{path.relative_to(ROOT)}:{line}: {table}"
             for top in SCANNED for path in sorted((ROOT / top).rglob("*.py"))
             for line, table in sql_over_views(path.read_text(), tables)]
    assert found == [], "SQL over view tables outside projections/ (add a query function " \
        "to projections/<view>_queries.py instead):\n" + "\n".join(found)
