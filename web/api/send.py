"""``POST /api/v1/studies/{study_uid}/send``: send a stored study, or one of its series, to a
destination as the caller (with an optional reason). The deliveries go out like any routed
job's; each job's timeline shows who sent it. The study page's send form uses ``send_study``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.application.bulk import BulkFilterError
from router.application.send import Sender
from web.api.common import ApiError, json_response, read_json, run_command
from web.auth import actor_of
from web.filters import UID_RE
from web.freshness import fresh
from web.keys import ROUTER_KEY
from web.routes import Route

CHANGE_WAIT_S = 5.0


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: str = Field(min_length=1, max_length=64)
    series_uid: str | None = Field(None, max_length=64, description="only this series")
    reason: str = Field("", max_length=500)


class FieldError(Exception):
    """Carries a BulkFilterError past run_command (which would drop its field)."""

    def __init__(self, error: BulkFilterError) -> None:
        super().__init__(str(error))
        self.error = error


def checked(sender: Sender, study_uid: str, body: SendRequest, actor: Any) -> Any:
    try:
        return sender.send(study_uid, body.series_uid, body.destination, body.reason, actor)
    except BulkFilterError as exc:
        raise FieldError(exc) from None


async def send_study(request: web.Request, study_uid: str, body: SendRequest
                     ) -> dict[str, Any]:
    """Send as the caller; ApiError 404 (study, series) or 422 (destination, bad UID)."""
    if not UID_RE.match(study_uid):
        raise ApiError(404, "no study with this Study Instance UID")
    if body.series_uid is not None and not UID_RE.match(body.series_uid):
        raise ApiError(422, "series_uid: a DICOM UID is digits and dots, at most 64 "
                            "characters", {"series_uid": "not a DICOM UID"})
    router = request.app[ROUTER_KEY]
    sender = Sender(router.stores, router.admin, router.commands, router.view_db("jobs"))
    await fresh(request, "jobs")
    try:
        result = await run_command(checked, sender, study_uid, body, actor_of(request))
    except FieldError as exc:
        raise ApiError(422, str(exc.error), {exc.error.field: exc.error.message}) from None
    await fresh(request, "jobs", timeout=CHANGE_WAIT_S)
    return {"study_uid": study_uid, "series_uid": body.series_uid,
            "destination": body.destination, "instances": result.instances,
            "scheduled": result.scheduled, "already_waiting": result.waiting,
            "correlation_id": result.correlation_id}


async def send(request: web.Request) -> web.Response:
    body = await read_json(request, SendRequest)
    return json_response(await send_study(request, request.match_info["study_uid"], body),
                         status=202)


ROUTES = [
    Route("POST", "/api/v1/studies/{study_uid}/send", send, "jobs.write",
          "Send a stored study (or one series) to a destination as the caller; answers how"
          " many instances were scheduled. 404: unknown study or series; 422: unknown"
          " destination", body=SendRequest, tags=("studies",)),
]
