"""Every DICOMweb and WADO-URI call is recorded in the access log: who (from the request),
which study and patient, what was asked and the outcome. Handlers fill an :class:`AccessNote`
as they learn what they touch; :func:`audited` records it however the call ends.

Details hold levels, counts, attribute names and transfer syntaxes, never tag values.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from router.application.sessions import AccessRecord
from web.api.common import ApiError
from web.auth import record_access
from web.dicomweb.multipart import ClientGone

logger = logging.getLogger(__name__)
_LOOKS_LIKE_UID = re.compile(r"^[0-9A-Za-z.]{1,64}$")

NoteHandler = Callable[[web.Request, "AccessNote"], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AccessNote:
    """What one call touched; becomes one access record."""

    action: str
    object_type: str
    object_id: str = ""
    study_uid: str | None = None
    patient_id: str | None = None
    detail: str = ""
    stream: web.StreamResponse | None = None  # set once a streamed answer has started

    def about(self, study_uid: str | None, patient_id: str | None, object_id: str = "") -> None:
        self.study_uid = study_uid
        self.patient_id = patient_id
        self.object_id = object_id or study_uid or ""

    def add(self, text: str) -> None:
        self.detail = f"{self.detail}; {text}" if self.detail else text

    def record(self, outcome: str) -> AccessRecord:
        return AccessRecord(action=self.action, object_type=self.object_type,
                            object_id=self.object_id[:200], outcome=outcome,
                            study_instance_uid=self.study_uid, patient_id=self.patient_id,
                            detail=self.detail)


def _asked(request: web.Request, name: str, query: str) -> str | None:
    """A UID the request names (path or WADO-URI query), if it looks like one at all."""
    value = request.match_info.get(name) or request.query.get(query)
    return value if value and _LOOKS_LIKE_UID.match(value) else None


def audited(action: str, object_type: str) -> Callable[[NoteHandler], Handler]:
    """Wrap a handler ``(request, note)`` so that its call is recorded with its outcome."""

    def wrap(handler: NoteHandler) -> Handler:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            note = AccessNote(action, object_type)
            note.about(_asked(request, "study", "studyUID"), None,
                       _asked(request, "instance", "objectUID")
                       or _asked(request, "series", "seriesUID") or "")
            outcome = "failure"
            try:
                response = await handler(request, note)
                outcome = "success"
                return response
            except ApiError as exc:
                outcome = "not_found" if exc.status == 404 else "failure"
                note.add(f"answered {exc.status}")
                raise
            except ClientGone as gone:
                note.add("client closed the connection")
                return gone.response
            except Exception as exc:
                if note.stream is None or not note.stream.prepared:
                    raise
                # Headers are gone: all we can do is end the body early and say why in the log
                # (the exception's type only: messages can quote tag values).
                logger.error("%s failed while streaming: %s", action, type(exc).__name__)
                note.add("failed while streaming")
                return note.stream
            finally:
                await record_access(request, note.record(outcome))

        return run

    return wrap
