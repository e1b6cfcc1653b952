"""Reads of the storage_commitments table of the jobs view (projections/commitments.py) for the
commitment worker (router/dicom/commitment_scp.py)."""

from __future__ import annotations

from typing import Any

from projections.db import Queryable

PENDING_SQL = ("SELECT commitment_id, node, requested_at, deadline, next_attempt_at"
               " FROM storage_commitments WHERE status = 'pending'")


def pending_commitments(db: Queryable) -> list[dict[str, Any]]:
    """Every commitment whose report is still to be sent, with when it is due."""
    return db.query(PENDING_SQL)
