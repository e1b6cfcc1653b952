"""The ATNA sender: follows the audit view's rows with its own positions and sends each row's
audit message to the audit record repository, at least once.

Its positions (one per log, like a view's) are kept in the audit database's
``projection_positions`` under the name ``atna`` and move only after a batch was received
(router/atna/syslog.py). After an outage it resends from there, with a backoff doubling from
1 s up to ``[atna] retry_max``: nothing is lost, and a message is sent twice only when it was
in the batch in flight when the repository went away. One node of a cluster sends (the
``atna`` duty, router/cluster/leadership.py); a rebuilt audit view has the same row keys, so
a rebuild sends nothing again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from projections import audit_queries
from projections.db import ViewDatabase
from projections.positions import save_position, view_positions
from router.atna.messages import Source, message_for
from router.atna.syslog import SyslogError, rfc5424, send_tls, send_udp, tls_context
from router.settings_audit import AtnaSettings

logger = logging.getLogger(__name__)

VIEW = "atna"
LOGS = ("ingest", "delivery", "admin", "access")
POLL = 1.0


def tls_context_for(settings: AtnaSettings) -> ssl.SSLContext | None:
    """The TLS client context of ``[atna]`` (None for UDP); raises TlsConfigError naming a
    missing or unusable file."""
    if settings.transport != "tls" or settings.ca_certificates is None:
        return None
    return tls_context(settings.ca_certificates, settings.certificate, settings.private_key)


class AtnaSender:
    """Sends audit messages in batches from a thread; :meth:`send_batch` does one batch."""

    def __init__(self, settings: AtnaSettings, audit_db: ViewDatabase, source: Source,
                 leads: Callable[[], bool] = lambda: True,
                 context: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._db = audit_db
        self._source = source
        self._leads = leads
        self._context = context or (tls_context_for(settings)
                                    if settings.transport == "tls" else None)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0  # messages sent (a resent batch counts again)
        self.failures = 0  # consecutive failed sends
        self.last_error = ""
        self.last_sent_at: float | None = None

    # --- one batch ------------------------------------------------------------------------
    def positions(self) -> dict[str, int]:
        return view_positions(self._db, VIEW)

    def send_batch(self) -> int:
        """Send the next rows (up to batch_size per log); returns how many rows were handled
        (0: nothing new). Raises SyslogError when the repository did not take them."""
        done = self.positions()
        rows: list[dict[str, Any]] = []
        for log in LOGS:
            rows += audit_queries.rows_after(self._db, log, done.get(log, 0),
                                            self._settings.batch_size)
        if not rows:
            return 0
        rows.sort(key=lambda r: (r["occurred_at"], r["application"], r["position"]))
        messages = self._messages(rows)
        if messages:
            self._send(messages)
            self.sent += len(messages)
            self.last_sent_at = time.time()
        moved: dict[str, int] = {}
        for row in rows:
            moved[row["application"]] = max(moved.get(row["application"], 0),
                                            int(row["position"]))
        with self._db.transaction() as cur:
            for log, position in moved.items():
                save_position(cur, VIEW, log, position)
        return len(rows)

    def _messages(self, rows: list[dict[str, Any]]) -> list[bytes]:
        deliveries = [r for r in rows if r["action"].startswith("Delivery.")]
        types = self._destination_types() if deliveries else {}
        names = self._destination_names({r["object_id"] for r in deliveries})
        out = []
        for row in rows:
            if row["object_id"] in names:  # later delivery events name only the delivery
                row = {**row, "destination": names[row["object_id"]]}
            try:
                xml = message_for(row, self._source, types)
            except Exception:  # a row we cannot describe must not stop the others
                logger.exception("ATNA: no audit message for row %s/%s (%s)",
                                 row["application"], row["position"], row["action"])
                continue
            if xml is not None:
                out.append(rfc5424(xml, self._source.host, self._settings.app_name,
                                   str(os.getpid()), float(row["occurred_at"])))
        return out

    def _destination_names(self, delivery_ids: set[str]) -> dict[str, str]:
        """Delivery id -> destination name, from each delivery's Delivery.Created row."""
        import json

        if not delivery_ids:
            return {}
        names: dict[str, str] = {}
        for row in audit_queries.deliveries_created(self._db, sorted(delivery_ids)):
            try:
                detail = json.loads(row["detail"] or "{}")
            except ValueError:
                continue
            if isinstance(detail, dict) and detail.get("destination"):
                names[row["object_id"]] = str(detail["destination"])
        return names

    def _destination_types(self) -> dict[str, str]:
        import json

        types: dict[str, str] = {}
        for row in audit_queries.destination_configs(self._db):
            try:
                detail = json.loads(row["detail"] or "{}")
            except ValueError:
                continue
            if isinstance(detail, dict) and detail.get("name") and detail.get("type"):
                types[str(detail["name"])] = str(detail["type"])
        return types

    def _send(self, messages: list[bytes]) -> None:
        s = self._settings
        if s.transport == "udp":
            send_udp(s.host, s.port, messages, s.timeout)
        else:
            assert self._context is not None
            send_tls(s.host, s.port, self._context, messages, s.timeout)

    # --- the thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="atna", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, then send what is left once (the router's own stop, when the
        repository is up; else it goes out at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout=self._settings.timeout + 5)
        self._thread = None
        if not self._leads():
            return
        try:
            while self.send_batch():
                pass
        except SyslogError as exc:
            logger.warning("ATNA: the last audit messages wait for the next start (%s)", exc)
        except Exception:
            logger.exception("ATNA: the final send failed")

    def state(self) -> dict[str, Any]:
        """For /readyz (public: counts only, the error stays in the log)."""
        return {"sent": self.sent, "failures": self.failures,
                "last_sent_at": self.last_sent_at}

    def backoff(self) -> float:
        return float(min(self._settings.retry_max, 2.0 ** min(self.failures - 1, 30)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self._leads():
                self._wake.wait(POLL)
                continue
            try:
                handled = self.send_batch()
            except SyslogError as exc:
                self.failures += 1
                self.last_error = str(exc)
                logger.warning("ATNA: audit repository %s:%d did not take a batch (%s); "
                               "retrying in %.0f s", self._settings.host, self._settings.port,
                               exc, self.backoff())
                self._stop.wait(self.backoff())
                continue
            except Exception:
                self.failures += 1
                logger.exception("ATNA: sending failed; retrying in %.0f s", self.backoff())
                self._stop.wait(self.backoff())
                continue
            if self.failures:
                logger.info("ATNA: audit repository reachable again")
            self.failures = 0
            self.last_error = ""
            if not handled:
                self._wake.wait(POLL)
