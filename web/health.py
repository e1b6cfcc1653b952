"""Health and metrics: /healthz and /readyz (public, for probes), /metrics (Prometheus; no PHI,
but it names destinations and their backlog: a bearer token with metrics.read, unless
``[web] public_metrics = true``)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from projections.stats_queries import metric_counts
from web.keys import ROUTER_KEY
from web.ports import RouterPort
from web.routes import Route
from web.security import PUBLIC

METRICS_PATH = "/metrics"


def _router(request: web.Request) -> Any:
    return request.app[ROUTER_KEY]


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: started, event stores reachable, views readable (with their lag)."""
    router = _router(request)
    try:
        health = await asyncio.to_thread(router.health)
    except Exception as exc:
        return web.json_response({"ready": False, "error": type(exc).__name__}, status=503)
    return web.json_response(health, status=200 if health["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: deliveries by destination and status, receipts, view lag."""
    router = _router(request)
    lines = await asyncio.to_thread(_metric_lines, router)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def _metric_lines(router: RouterPort) -> list[str]:
    counts = metric_counts(router.view_db("jobs"))
    lines = ["# TYPE dicom_router_deliveries gauge"]
    for row in counts["deliveries"]:
        lines.append(f'dicom_router_deliveries{{destination="{_label(row["destination"])}",'
                     f'status="{row["status"]}"}} {row["n"]}')
    lines.append("# TYPE dicom_router_receipts gauge")
    for row in counts["receipts"]:
        lines.append(f'dicom_router_receipts{{routing="{row["routing"]}"}} {row["n"]}')
    lines.append("# TYPE dicom_router_receipt_failures gauge")
    lines.append(f"dicom_router_receipt_failures {counts['receipt_failures']}")
    lines.append("# TYPE dicom_router_view_lag gauge")
    for name, lag in router.health()["view_lag"].items():
        lines.append(f'dicom_router_view_lag{{view="{name}"}} {lag}')
    gate = router.gate
    if gate is not None:
        lines += _gate_lines(gate)
    atna = getattr(router, "atna", None)
    if atna is not None:  # docs/atna.md
        lines += ["# TYPE dicom_router_atna_messages_sent counter",
                  f"dicom_router_atna_messages_sent {atna.sent}",
                  "# TYPE dicom_router_atna_failed_sends gauge",
                  f"dicom_router_atna_failed_sends {atna.failures}"]
    return lines


def _gate_lines(gate: Any) -> list[str]:
    """The DICOM front door: what is open now, and what it refused since start."""
    now, stats = gate.snapshot(), gate.stats
    lines = ["# TYPE dicom_router_dicom_connections_pending gauge",
             f"dicom_router_dicom_connections_pending {now['pending']}",
             "# TYPE dicom_router_dicom_associations gauge",
             f"dicom_router_dicom_associations {now['associations']}",
             "# TYPE dicom_router_dicom_tls_tunnels gauge",
             f"dicom_router_dicom_tls_tunnels {now['tunnels']}",
             "# TYPE dicom_router_dicom_connections_total counter",
             f"dicom_router_dicom_connections_total {stats.accepted}",
             "# TYPE dicom_router_dicom_connections_closed_total counter"]
    for reason, count in (("pending_limit", stats.closed_pending_cap),
                          ("address_limit", stats.closed_address_cap),
                          ("no_request", stats.closed_before_request),
                          ("artim", stats.artim_expired),
                          ("protocol_error", stats.protocol_errors),
                          ("tls_failure", stats.tls_failures)):
        lines.append(f'dicom_router_dicom_connections_closed_total{{reason="{reason}"}} {count}')
    lines.append("# TYPE dicom_router_dicom_associations_rejected_total counter")
    for why, count in sorted(stats.rejected.items()):
        lines.append(f'dicom_router_dicom_associations_rejected_total{{reason="{_label(why)}"}}'
                     f" {count}")
    return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


ROUTES = [
    Route("GET", "/healthz", healthz, PUBLIC, "Liveness"),
    Route("GET", "/readyz", readyz, PUBLIC, "Readiness with view lag"),
    Route("GET", METRICS_PATH, metrics, "metrics.read",
          "Prometheus metrics (public with [web] public_metrics = true)"),
]
