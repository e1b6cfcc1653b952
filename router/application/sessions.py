"""Login sessions and access records, written to the access log.

A session is started at login (browser cookie or short-lived bearer token) and ended at logout;
a session that ended is refused from then on, also after a restart and on other nodes (the
check reads the access log, cached for a few seconds; this process's own logouts apply at once).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from eventsourcing.application import AggregateNotFoundError

from router.application.commands import Actor
from router.application.stores import EventStores
from router.domain.access import Access, Session

CHECK_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class AccessRecord:
    """What one access to PHI (or to the audit trail) is recorded with."""

    action: str  # "study.view", "jobs.list", "audit.export", ...
    object_type: str
    object_id: str = ""
    outcome: str = "success"  # success | denied | not_found | failure
    study_instance_uid: str | None = None
    patient_id: str | None = None
    detail: str = ""


class Sessions:
    """Start, end and check sessions; record accesses."""

    def __init__(self, stores: EventStores) -> None:
        self._stores = stores
        self._ended: set[str] = set()
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, actor: Actor, kind: str, expires_at: float) -> str:
        jti = str(uuid.uuid4())
        self._stores.access.save(Session(jti, **actor.ctx(), kind=kind, expires_at=expires_at))
        with self._lock:
            self._checked[jti] = time.monotonic()
        return jti

    def end(self, jti: str, actor: Actor, reason: str = "logout") -> None:
        with self._lock:
            self._ended.add(jti)
        session = self._load(jti)
        if session is not None and not session.ended:
            session.end(**actor.ctx(), reason=reason)
            self._stores.access.save(session)

    def is_active(self, jti: str) -> bool:
        """False once the session has ended (expiry is the token's own business)."""
        with self._lock:
            if jti in self._ended:
                return False
            checked = self._checked.get(jti)
            if checked is not None and time.monotonic() - checked < CHECK_CACHE_SECONDS:
                return True
        session = self._load(jti)
        with self._lock:
            if session is None or session.ended:
                self._ended.add(jti)
                return False
            self._checked[jti] = time.monotonic()
            if len(self._checked) > 10000:
                self._checked.clear()
        return True

    def record(self, actor: Actor, record: AccessRecord) -> None:
        self._stores.access.save(Access(
            **actor.ctx(), action=record.action, object_type=record.object_type,
            object_id=record.object_id[:200], outcome=record.outcome,
            study_instance_uid=record.study_instance_uid, patient_id=record.patient_id,
            detail=record.detail[:1000]))

    def _load(self, jti: str) -> Session | None:
        try:
            aggregate: object = self._stores.access.repository.get(uuid.UUID(jti))
        except (AggregateNotFoundError, ValueError):
            return None
        return aggregate if isinstance(aggregate, Session) else None
