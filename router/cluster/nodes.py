"""The router nodes that share this database, and when each was last seen.

Each node writes its row at start and then every ``interval`` seconds (a heartbeat), and marks
it stopped when it stops. The health page lists them: a node not seen for three intervals is
shown as missing. The rows are coordination state, not history (the events say which node
received each object and made each attempt), so they live beside the views, not in a log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from projections.db import ViewDatabase

logger = logging.getLogger(__name__)

NODES_SQL = """CREATE TABLE IF NOT EXISTS router_nodes (
    node_id TEXT PRIMARY KEY, instance TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL, stopped_at DOUBLE PRECISION,
    dicom_port INTEGER, http_port INTEGER, pid INTEGER, duties TEXT)"""

_UPSERT = (
    "INSERT INTO router_nodes (node_id, instance, started_at, last_seen, stopped_at,"
    " dicom_port, http_port, pid) VALUES (?, ?, ?, ?, NULL, ?, ?, ?)"
    " ON CONFLICT (node_id) DO UPDATE SET instance = excluded.instance,"
    " started_at = excluded.started_at, last_seen = excluded.last_seen, stopped_at = NULL,"
    " dicom_port = excluded.dicom_port, http_port = excluded.http_port, pid = excluded.pid"
)

HEARTBEAT = 5.0  # seconds between a node's writes of its row
MISSING_AFTER = 3  # heartbeats: a node not seen for this many is shown as missing


class NodeRegistry:
    """This node's row in ``router_nodes`` and the list of all of them."""

    def __init__(self, db: ViewDatabase, node_id: str, *, dicom_port: int, http_port: int,
                 interval: float = HEARTBEAT, clock: Callable[[], float] = time.time,
                 duties: Callable[[], list[str]] = list) -> None:
        self._db = db
        self._duties = duties  # what this node does for the cluster now (router.cluster)
        self.node_id = node_id
        self._instance = uuid.uuid4().hex  # tells this run from an earlier one of the node
        self._ports = (dicom_port, http_port)
        self._interval = interval
        self._clock = clock
        self._started_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure_table(self) -> None:
        with self._db.transaction() as cur:
            cur.execute(NODES_SQL)

    def start(self, dicom_port: int | None = None) -> None:
        """Write our row (warning when another running node has our id) and keep it fresh;
        ``dicom_port``: the port really bound, when the settings said 0 (any). The table is
        made by :meth:`ensure_table` (a node does it under the schema lock as it is built)."""
        if dicom_port:
            self._ports = (dicom_port, self._ports[1])
        now = self._clock()
        for row in self._db.query("SELECT instance, last_seen, stopped_at FROM router_nodes"
                                  " WHERE node_id = ?", (self.node_id,)):
            if row["stopped_at"] is None and now - row["last_seen"] < self._interval * 2:
                logger.warning(
                    "node id %r was seen %.0f s ago and did not stop: another node may be "
                    "running with the same id (set DICOM_ROUTER_NODE_ID on each node), or this "
                    "node restarted after a crash", self.node_id, now - row["last_seen"])
        self._started_at = now
        with self._db.transaction() as cur:
            cur.execute(_UPSERT, (self.node_id, self._instance, now, now, *self._ports,
                                  os.getpid()))
        self._thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as exc:  # the database is away: the next beat tries again
                logger.warning("node heartbeat failed: %s", type(exc).__name__)

    def beat(self) -> None:
        with self._db.transaction() as cur:
            cur.execute("UPDATE router_nodes SET last_seen = ?, stopped_at = NULL, duties = ?"
                        " WHERE node_id = ? AND instance = ?",
                        (self._clock(), ", ".join(self._duties()), self.node_id,
                         self._instance))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._db.transaction() as cur:
                now = self._clock()
                cur.execute("UPDATE router_nodes SET last_seen = ?, stopped_at = ?, duties = ''"
                            " WHERE node_id = ? AND instance = ?",
                            (now, now, self.node_id, self._instance))
        except Exception as exc:
            logger.warning("could not mark node %s stopped: %s", self.node_id,
                           type(exc).__name__)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node ever seen, by id, with its state: ``up``, ``stopped`` or
        ``missing`` (not seen for three heartbeats and not stopped: crashed, or cut off)."""
        now = self._clock()
        rows = self._db.query("SELECT node_id, started_at, last_seen AS last_seen_at,"
                              " stopped_at, dicom_port, http_port, duties FROM router_nodes"
                              " ORDER BY node_id")
        for row in rows:
            if row["stopped_at"] is not None:
                row["state"] = "stopped"
            elif now - row["last_seen_at"] > self._interval * MISSING_AFTER:
                row["state"] = "missing"
            else:
                row["state"] = "up"
            row["this_node"] = row["node_id"] == self.node_id
        return rows
