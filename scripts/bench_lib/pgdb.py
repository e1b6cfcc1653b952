"""PostgreSQL databases of the router's ``--backend postgres`` runs: one fresh database per router
start, created through an admin URL and dropped (WITH (FORCE)) when the run ends, fails or is
interrupted; ``drop_all`` catches any left when the bench exits.
"""

from __future__ import annotations

import os
import re
import secrets
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ADMIN_URL_ENV = "BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFIX = "dicom_bench_"
_MAX_NAME = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated

_LIVE: dict[str, str] = {}  # name -> admin URL of every database created and not yet dropped


def admin_url(option: str | None = None) -> str:
    """The ``--postgres-url`` option, else $BENCH_POSTGRES_URL, else the local test server."""
    return option or os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL


def database_name(label: str) -> str:
    """A new, unique database name for a run labelled ``label`` (receiver, workload, repeat):
    lower-case letters, digits and underscores only, within PostgreSQL's 63 bytes, ending in
    random hex so that concurrent benches on one server never share one."""
    tail = "_" + secrets.token_hex(4)
    middle = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    return PREFIX + middle[: _MAX_NAME - len(PREFIX) - len(tail)] + tail


def database_url(admin: str, name: str) -> str:
    """``admin`` with its database (the URL's path) replaced by ``name``, query kept."""
    parts = urlsplit(admin)
    return urlunsplit(parts._replace(path="/" + name))


def create(admin: str, label: str) -> tuple[str, str]:
    """Create a fresh database; its (name, URL). It is remembered until dropped."""
    name = database_name(label)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _LIVE[name] = admin
    return name, database_url(admin, name)


def drop(name: str) -> None:
    """Drop a database :func:`create` made, closing its sessions first (a router killed
    mid-run may leave some)."""
    admin = _LIVE.get(name)
    if admin is None:
        return
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(statement.format(sql.Identifier(name)))
    del _LIVE[name]


def live() -> list[str]:
    """Databases created and not dropped yet."""
    return list(_LIVE)


def drop_all() -> list[str]:
    """Drop every database still live (on exit); the names that could not be dropped."""
    failed = []
    for name in live():
        try:
            drop(name)
        except psycopg.Error:
            failed.append(name)
    return failed
