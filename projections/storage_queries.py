"""Reads for the storage page and ``/api/v1/storage``: the purge runs of the blob store, from
the jobs view's ``blob_purges`` rows (one per purged job; a run is one ``purge_id``).
"""

from __future__ import annotations

from typing import Any

from projections.db import ViewDatabase

# One row per purge run: when, by whom, jobs, distinct objects and their bytes.
PURGES_SQL = (
    "SELECT r.purge_id, MIN(r.purged_at) AS purged_at, MIN(r.actor) AS actor,"
    " SUM(r.jobs) AS jobs, COUNT(*) AS objects, SUM(r.size) AS total_size FROM ("
    "SELECT purge_id, sha256, MIN(purged_at) AS purged_at, MIN(actor) AS actor,"
    " COUNT(*) AS jobs, MAX(size) AS size FROM blob_purges GROUP BY purge_id, sha256) r"
    " GROUP BY r.purge_id ORDER BY MIN(r.purged_at) DESC, r.purge_id LIMIT ? OFFSET ?"
)
PURGE_COUNT_SQL = "SELECT COUNT(DISTINCT purge_id) AS n FROM blob_purges"


def purge_runs(db: ViewDatabase, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """One page of purge runs, latest first (``purge_id``, ``purged_at``, ``actor``, ``jobs``,
    ``objects``, ``total_size``); and how many runs there are."""
    rows = db.query(PURGES_SQL, (limit, offset))
    return rows, int(db.query(PURGE_COUNT_SQL)[0]["n"])
