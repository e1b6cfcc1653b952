"""AI processors over HTTP: the signed callback (``POST /api/v1/ai/callbacks/{id}``, a PUBLIC
route authenticated by its HMAC signature), the list of AI round trips and a test ping.

A callback that is oversized (413), stale or wrongly signed (401), for an unknown request
(404) or a replay (409) changes nothing and leaves an ``ai.callback`` row with outcome
``denied`` in the access log (the security audit trail).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from aiohttp import web

from projections.ai_requests_queries import list_requests
from router.ai.callbacks import CallbackError, ResultFile
from router.ai.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    check_signature,
    check_timestamp,
    signer,
)
from router.application.commands import Actor
from router.application.sessions import AccessRecord
from router.dispatch.ai import AIAdapter
from router.dispatch.base import (
    NOT_REACHED,
    NOT_REACHED_MIN_SECONDS,
    DeliveryError,
    RefusedAddressError,
    UnreachableError,
)
from web.api.common import ApiError, json_response, paging, run_command
from web.auth import actor_of
from web.dicomweb.multipart_in import (
    BodyTooLargeError,
    MultipartError,
    Part,
    discard,
    parse_media_type,
    read_parts,
)
from web.keys import ROUTER_KEY
from web.routes import Route

logger = logging.getLogger(__name__)

MAX_JSON = 1024 * 1024
MAX_PARTS = 1000


class _Signed:
    """The request body as read_parts reads it, fed to the HMAC and counted."""

    def __init__(self, request: web.Request, mac: hmac.HMAC, limit: int) -> None:
        self._content = request.content
        self.mac = mac
        self.limit = limit
        self.size = 0

    async def readany(self) -> bytes:
        data = await self._content.readany()
        self.size += len(data)
        if self.size > self.limit:
            raise BodyTooLargeError(f"a callback may carry at most {self.limit} bytes")
        self.mac.update(data)
        return data

    async def rest(self) -> bytes:
        out = bytearray()
        while data := await self.readany():
            out += data
        return bytes(out)


async def _refuse(request: web.Request, status: int, reason: str, rid: str) -> ApiError:
    router = request.app[ROUTER_KEY]
    await asyncio.to_thread(router.sessions.record, Actor(
        "anonymous", request.remote or "", rid), AccessRecord(
        action="ai.callback", object_type="ai_request", object_id=rid[:64], outcome="denied",
        detail=f"{status}: {reason}"))
    return ApiError(status, reason)


async def _read(request: web.Request, body: _Signed) -> tuple[object, list[Part]]:
    """(JSON document, DICOM parts) of a JSON or multipart/related body."""
    media, params = parse_media_type(request.headers.get("Content-Type", ""))
    if media == "application/json":
        return _json(await body.rest()), []
    if media != "multipart/related" or "boundary" not in params:
        raise ApiError(415, "send application/json, or multipart/related with a JSON part "
                            "first and DICOM parts after it")
    router = request.app[ROUTER_KEY]
    parts = await read_parts(body, params["boundary"], router.blobs.spool_dir,
                             max_bytes=body.limit, max_parts=MAX_PARTS)
    await body.rest()  # the epilogue is signed too
    if not parts or parse_media_type(parts[0].content_type)[0] != "application/json" \
            or parts[0].size > MAX_JSON:
        discard(parts)
        raise ApiError(400, "the first part must be the JSON result (at most 1 MiB)")
    document = _json(parts[0].path.read_bytes())
    discard(parts[:1])
    return document, parts[1:]


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        raise ApiError(400, "the callback JSON is not valid JSON") from None


async def callback(request: web.Request) -> web.StreamResponse:
    """An AI processor's result, verified before anything is recorded."""
    router = request.app[ROUTER_KEY]
    rid = request.match_info["correlation_id"]
    limit = router.settings.ai.max_callback_bytes
    if (request.content_length or 0) > limit:
        raise await _refuse(request, 413, f"a callback may carry at most {limit} bytes", rid)
    try:
        timestamp = check_timestamp(request.headers.get(TIMESTAMP_HEADER), time.time())
    except SignatureError as exc:
        raise await _refuse(request, 401, exc.reason, rid) from None
    aggregate = await asyncio.to_thread(router.ai_requests.load, rid)
    secret = router.ai_callbacks.secret(aggregate) if aggregate is not None else None
    if aggregate is None or secret is None:
        raise await _refuse(request, 404, "unknown correlation id", rid)
    mac = signer(secret)
    mac.update(f"{timestamp}.".encode())
    body = _Signed(request, mac, limit)
    try:
        document, parts = await _read(request, body)
    except BodyTooLargeError as exc:
        raise await _refuse(request, 413, str(exc), rid) from None
    except MultipartError as exc:
        raise ApiError(400, f"bad multipart body: {exc}") from None
    try:
        signature = check_signature(request.headers.get(SIGNATURE_HEADER), mac)
    except SignatureError as exc:
        await asyncio.to_thread(discard, parts)
        raise await _refuse(request, 401, exc.reason, rid) from None
    return await _apply(request, aggregate, signature, document, parts, rid)


async def _apply(request: web.Request, aggregate: Any, signature: str, document: object,
                 parts: list[Part], rid: str) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    files = [ResultFile(p.path, p.sha256, p.size) for p in parts]
    try:
        result = await asyncio.to_thread(router.ai_callbacks.apply, aggregate, signature,
                                         document, files, request.remote or "")
    except CallbackError as exc:
        await asyncio.to_thread(discard, parts)
        if exc.status == 409:
            raise await _refuse(request, 409, exc.message, rid) from None
        raise ApiError(exc.status, exc.message) from None
    await asyncio.to_thread(router.sessions.record, Actor(
        f"ai:{aggregate.destination}", request.remote or "", rid), AccessRecord(
        action="ai.callback", object_type="ai_request", object_id=rid,
        study_instance_uid=aggregate.study_instance_uid,
        detail=f"{result['status']}: {result['result_objects']} result object(s)"))
    return json_response(result)


async def requests_list(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    limit, offset = paging(request)
    destination = request.query.get("destination") or None
    rows = await asyncio.to_thread(list_requests, router.view_db("jobs"), destination,
                                   request.query.get("study_uid") or None, limit, offset)
    return json_response({"items": rows, "limit": limit, "offset": offset})


async def run_ping(request: web.Request, name: str) -> dict[str, Any]:
    """A signed ``{"ping": true}`` to the processor, through the SSRF checks and allow-list."""
    router = request.app[ROUTER_KEY]
    state = router.admin.snapshot().live_destinations().get(name)
    if state is None or state.config.get("type") != "ai":
        raise ApiError(404, f"no AI processor named {name!r}")

    def run() -> dict[str, Any]:
        started = time.monotonic()
        try:
            adapter = AIAdapter(router.ai_requests.config(name), policy=router.ai_requests.policy)
            return {"ok": True, "detail": adapter.check()}
        except (RefusedAddressError, UnreachableError) as exc:
            # Like a destination's test: one answer for every processor not reached.
            logger.info("ping of AI processor %s: %s", name, exc)
            time.sleep(max(0.0, started + NOT_REACHED_MIN_SECONDS - time.monotonic()))
            return {"ok": False, "detail": NOT_REACHED}
        except DeliveryError as exc:
            return {"ok": False, "detail": str(exc)}

    return await asyncio.to_thread(run)


async def ping(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    return json_response({"name": name, **await run_ping(request, name)})


async def requeue(request: web.Request) -> web.StreamResponse:
    """Make a dead-lettered or waiting AI request again now."""
    router = request.app[ROUTER_KEY]
    await run_command(router.ai_requests.requeue, request.match_info["request_id"],
                      actor_of(request))
    return json_response({"requeued": request.match_info["request_id"]}, 202)


ROUTES = [
    Route("POST", "/api/v1/ai/callbacks/{correlation_id}", callback, "public",
          "AI processor callback (signed: X-Signature-Timestamp, X-Signature)", tags=("ai",)),
    Route("GET", "/api/v1/ai/requests", requests_list, "destinations.read",
          "AI round trips, newest first", query=("destination", "study_uid", "limit",
                                                 "offset"), tags=("ai",)),
    Route("POST", "/api/v1/ai/processors/{name}/ping", ping, "destinations.write",
          "Send a signed test ping to an AI processor", tags=("ai",)),
    Route("POST", "/api/v1/ai/requests/{request_id}/requeue", requeue, "jobs.write",
          "Make an AI request again now (dead-lettered or retrying)", tags=("ai",)),
]
