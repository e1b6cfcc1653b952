"""What the dashboard and ``/api/v1/stats`` show: objects received and delivered per minute
over the last hour (audit view), queue depth and the oldest waiting delivery per destination,
failures (dead-lettered deliveries, refused receipts) and each destination's health (jobs view
plus the pause flags of the admin state; destination health is the destinations page's, from
projections.destinations_queries); and the counts of ``/metrics``. No PHI: counts,
destinations, AE titles, times.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from projections.db import ViewDatabase
from projections.destinations_queries import health

WINDOW_MINUTES = 60
RECENT = 10  # recent failures listed


def minute_expr(db: ViewDatabase, column: str) -> str:
    # CAST rounds on PostgreSQL and truncates on SQLite; FLOOR is not built into every SQLite.
    if db.dialect == "postgres":
        return f"CAST(FLOOR({column} / 60) AS BIGINT)"
    return f"CAST({column} / 60 AS INTEGER)"


def throughput(audit_db: ViewDatabase, now: float) -> list[dict[str, Any]]:
    """Objects received and deliveries succeeded in each of the last 60 minutes (oldest
    first; the last bucket is the current, partial minute)."""
    current = int(now // 60)
    first = current - WINDOW_MINUTES + 1
    rows = audit_db.query(
        f"SELECT {minute_expr(audit_db, 'occurred_at')} AS bucket, action, count(*) AS n"
        " FROM audit WHERE occurred_at >= ? AND action IN ('Job.Received', 'Delivery.Succeeded')"
        " GROUP BY bucket, action", (first * 60.0,))
    buckets = {m: {"start_at": m * 60.0, "received": 0, "delivered": 0}
               for m in range(first, current + 1)}
    for row in rows:
        bucket = buckets.get(int(row["bucket"]))
        if bucket is not None:
            key = "received" if row["action"] == "Job.Received" else "delivered"
            bucket[key] += int(row["n"])
    return list(buckets.values())


def destinations(jobs_db: ViewDatabase, configured: Mapping[str, Any], now: float
                 ) -> list[dict[str, Any]]:
    """Per destination: queue depth and oldest waiting delivery, dead letters, last success
    and failure, failures since the last success, pause flag and a one-word health (the same
    figures as the destinations page; the last error text stays there)."""
    live = {name: state for name, state in configured.items() if not state.deleted}
    out = []
    for name, found in health(jobs_db, {n: s.paused for n, s in live.items()}, now).items():
        item = found.to_dict()
        item.pop("last_error", None)
        item["queue_depth"] = item.pop("backlog")
        item["type"] = live[name].config.get("type") if name in live else None
        item["deleted"] = name not in live
        item["health"] = "deleted" if item["deleted"] else item.pop("state")
        item.pop("state", None)
        out.append(item)
    return out


def failures(jobs_db: ViewDatabase, now: float) -> dict[str, Any]:
    """Dead-lettered deliveries and refused receipts: totals, last hour, the latest few."""
    since = now - 3600.0
    counts = jobs_db.query(
        "SELECT count(*) AS total, SUM(CASE WHEN failed_at >= ? THEN 1 ELSE 0 END) AS recent"
        " FROM receipt_failures", (since,))[0]
    recent_receipts = jobs_db.query(
        "SELECT failed_at, source, source_ip, calling_aet, called_aet, status, reason"
        " FROM receipt_failures ORDER BY failed_at DESC LIMIT ?", (RECENT,))
    dead_recent = jobs_db.query(
        "SELECT count(*) AS n FROM deliveries WHERE status = 'dead' AND last_attempt_at >= ?",
        (since,))[0]["n"]
    recent_dead = jobs_db.query(
        "SELECT job_id, destination, attempts, last_attempt_at FROM deliveries"
        " WHERE status = 'dead' ORDER BY last_attempt_at DESC LIMIT ?", (RECENT,))
    for row in recent_receipts:
        row["status_hex"] = f"0x{int(row['status']):04X}"
    return {
        "dead_lettered_last_hour": int(dead_recent or 0),
        "receipt_failures": int(counts["total"] or 0),
        "receipt_failures_last_hour": int(counts["recent"] or 0),
        "recent_receipt_failures": recent_receipts,
        "recent_dead_letters": recent_dead,
    }


def collect(jobs_db: ViewDatabase, audit_db: ViewDatabase, configured: Mapping[str, Any],
            now: float | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, read at one moment."""
    now = time.time() if now is None else now
    minutes = throughput(audit_db, now)
    per_destination = destinations(jobs_db, configured, now)
    failed = failures(jobs_db, now)
    failed["dead_lettered"] = sum(d["dead"] for d in per_destination)
    return {
        "generated_at": now,
        "throughput": {
            "minutes": minutes,
            "received_last_hour": sum(m["received"] for m in minutes),
            "delivered_last_hour": sum(m["delivered"] for m in minutes),
        },
        "queue_depth": sum(d["queue_depth"] for d in per_destination),
        "destinations": per_destination,
        "failures": failed,
    }


def metric_counts(jobs_db: ViewDatabase) -> dict[str, Any]:
    """What ``/metrics`` counts: deliveries by destination and (stored) status, receipts by
    routing, refused receipts."""
    return {
        "deliveries": jobs_db.query(
            "SELECT destination, status, count(*) AS n FROM deliveries"
            " GROUP BY destination, status ORDER BY destination, status"),
        "receipts": jobs_db.query(
            "SELECT routing, count(*) AS n FROM jobs GROUP BY routing ORDER BY routing"),
        "receipt_failures": int(
            jobs_db.query("SELECT count(*) AS n FROM receipt_failures")[0]["n"]),
    }
