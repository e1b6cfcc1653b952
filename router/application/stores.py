"""The event-sourced applications (ingest, delivery, admin, access), one log each, on SQLite
or PostgreSQL.

The log is split by write rate: receipts, delivery attempts and configuration never contend for
the same table lock. On SQLite each application has its own database file.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from eventsourcing.application import Application

from router.application.sqlite_writes import SQLITE_FACTORY_TOPIC


class IngestApplication(Application):
    """Jobs (receipt + routing decision), instance versions and receipt failures."""

    name = "ingest"


class DeliveryApplication(Application):
    """Deliveries: every attempt and its outcome."""

    name = "delivery"


class AdminApplication(Application):
    """Rules and destinations (later users and settings): low rate, fully replayed at start."""

    name = "admin"


class AccessApplication(Application):
    """Accesses to PHI and the audit trail, logins and sessions: written often, never replayed."""

    name = "access"


APP_NAMES = ("ingest", "delivery", "admin", "access")

# Our PostgreSQL recorder (router/application/pg_recorder.py), named and not imported here:
# importing it imports psycopg, 12 MB in each process of a router that runs on SQLite.
PG_RECORDER_TOPIC = "router.application.pg_recorder:FlushOutsideLockRecorder"

# PostgreSQL connections per application and process: (kept open, opened more under load).
# Several nodes share one server whose default max_connections is 100 (docs/scaling.md has
# the budget). None is kept: each pool opens its first as its application starts and more
# while callers wait, and closes those idle for 10 minutes. (Keeping one made two at start,
# since the application asks for one before the pool has opened the one it keeps, and three
# nodes starting together ran the server out of connections.)
POOLS: dict[str, dict[str, tuple[int, int]]] = {
    # The serving process: views read the ingest and delivery logs, the dispatcher and the
    # outcome recorder write delivery events, the web server all four.
    "server": {"ingest": (0, 6), "delivery": (0, 6), "admin": (0, 3), "access": (0, 4)},
    # A receiver process: receipts (one save per C-STORE, at most its associations at once);
    # its delivery and access logs serve queries only (C-MOVE, C-GET and their audit).
    "receiver": {"ingest": (0, 8), "delivery": (0, 2), "admin": (0, 2), "access": (0, 3)},
    # A command (migrate, apply, user, audit export, projections).
    "tool": {"ingest": (0, 2), "delivery": (0, 2), "admin": (0, 2), "access": (0, 2)},
}


@dataclass(frozen=True)
class StoreConfig:
    """Where the logs live: ``sqlite:///DIR``, ``postgresql://...`` or ``memory:`` (tests)."""

    database_url: str
    cipher_key: bytes | None = None  # 32 bytes: encrypts the ingest and access logs (PHI)
    role: str = "server"  # which POOLS apply (PostgreSQL)
    create_tables: bool = True  # False: a role that may not (``[server] manage_schema``)


def postgres_env(url: str) -> dict[str, str]:
    """eventsourcing's POSTGRES_* settings from a ``postgresql://user:pw@host:port/db`` URL."""
    parts = urlparse(url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": (parts.path or "/postgres").lstrip("/") or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        # Also the pool's wait for a connection, which eventsourcing retries 10 times: a
        # database that is down fails a save in about 20 s, inside a sender's DIMSE timeout.
        "POSTGRES_CONNECT_TIMEOUT": "2",
        # No test query before each use of a pooled connection: it was a round trip per save
        # (11% of a receipt's time on PostgreSQL, docs/benchmarks.md). A connection that died
        # meanwhile (the server restarted) fails its statement with an OperationalError,
        # which eventsourcing retries on another connection; the pool drops the dead one.
        "POSTGRES_PRE_PING": "n",
        # Each log's table lock is released before the WAL is flushed, not after
        # (router/application/pg_recorder.py): writers' flushes overlap.
        "APPLICATION_RECORDER_TOPIC": PG_RECORDER_TOPIC,
    }
    return env


def app_env(config: StoreConfig, name: str) -> dict[str, str]:
    """The environment one application is built with (never taken from os.environ)."""
    url = config.database_url
    if url.startswith(("postgresql://", "postgres://")):
        env = postgres_env(url)
        kept, extra = POOLS[config.role][name]
        env["POSTGRES_POOL_SIZE"] = str(kept)
        env["POSTGRES_MAX_OVERFLOW"] = str(extra)
        if config.role == "receiver":
            # The serving process made the tables before it started us. Creating them here
            # also took a connection while the pool was still opening its first ones, and
            # the pool kept the extra one (about 10 minutes).
            env["CREATE_TABLE"] = "no"
        if not config.create_tables:
            env["CREATE_TABLE"] = "no"
    elif url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///"))
        folder.mkdir(parents=True, exist_ok=True)
        env = {
            # eventsourcing's SQLite factory with our datastore: receivers and the supervisor
            # share the files, their writes take turns on a lock and sync the WAL after it
            # (router/application/sqlite_writes.py).
            "PERSISTENCE_MODULE": SQLITE_FACTORY_TOPIC,
            "SQLITE_DBNAME": str(folder / f"{name}.sqlite"),
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    elif url == "memory:":
        env = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    else:
        raise ValueError("database_url must be sqlite:///DIR, postgresql://... or memory:")
    env["AGGREGATE_CACHE_MAXSIZE"] = "20000" if name == "admin" else "2000"
    if name in ("ingest", "access") and config.cipher_key is not None:
        env["CIPHER_TOPIC"] = "eventsourcing.cryptography:AESCipher"
        env["CIPHER_KEY"] = base64.b64encode(config.cipher_key).decode()
    return env


class EventStores:
    """The applications of one router, built together and closed together."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.ingest = IngestApplication(env=_clean_env(app_env(config, "ingest")))
        self.delivery = DeliveryApplication(env=_clean_env(app_env(config, "delivery")))
        self.admin = AdminApplication(env=_clean_env(app_env(config, "admin")))
        self.access = AccessApplication(env=_clean_env(app_env(config, "access")))

    def by_name(self, name: str) -> Application:
        return self.all()[name]

    def all(self) -> dict[str, Application]:
        return {"ingest": self.ingest, "delivery": self.delivery, "admin": self.admin,
                "access": self.access}

    def close(self) -> None:
        for app in self.all().values():
            app.close()  # on SQLite this also closes the log's lock file


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    """Blank out persistence keys an operator's shell may carry, so only ours apply.

    eventsourcing merges os.environ under the env we pass; our values win, but keys we do not
    set (say a stray CIPHER_TOPIC or POSTGRES_SCHEMA) would leak in, so set them empty.
    """
    for key in ("CIPHER_TOPIC", "CIPHER_KEY", "COMPRESSOR_TOPIC", "POSTGRES_SCHEMA"):
        env.setdefault(key, "")
    env.setdefault("IS_SNAPSHOTTING_ENABLED", "no")
    return env


def open_stores(settings: Any, box: Any, role: str = "server",
                create_tables: bool | None = None) -> EventStores:
    """The stores of a router with these Settings; the ingest log is encrypted with a key
    derived from the master key unless ``encrypt_events`` is off. ``role`` (server,
    receiver, tool) sizes the PostgreSQL connection pools. Tables are created unless
    ``[server] manage_schema`` is off (``create_tables`` overrides it: migrate)."""
    key = box.derive("event-store/ingest") if settings.encrypt_events else None
    create = settings.manage_schema if create_tables is None else create_tables
    return EventStores(StoreConfig(settings.database_url, cipher_key=key, role=role,
                                   create_tables=create))
