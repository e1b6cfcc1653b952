"""AI processors' DICOMweb access: a ``drai_`` bearer token (router.ai.tokens) authenticates
as ``ai:<destination>`` and may only read (WADO-RS, QIDO-RS) or store to (STOW-RS) the one
study of its open request, through URLs that name that study. Anything else is 403 with an
``access.denied`` row, like any refused route.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from router.ai.tokens import PREFIX, AITokenError
from web.ports import RouterPort
from web.security import Principal

AI_PERMISSIONS = frozenset({"studies.read", "studies.store"})
AI_PATH = "/dicom-web/studies/"
VIA = "ai_token"

__all__ = ["AI_PERMISSIONS", "PREFIX", "VIA", "ai_allowed", "ai_principal"]


async def ai_principal(router: RouterPort, token: str) -> Principal | None:
    """The AI processor behind a valid token of a still open request, else None."""
    try:
        grant = router.ai_requests.tokens.check(token)
    except AITokenError:
        return None
    request = await asyncio.to_thread(router.ai_requests.load, grant.request_id)
    if (request is None or not request.is_open or request.destination != grant.destination
            or request.study_instance_uid != grant.study_instance_uid):
        return None
    return Principal(grant.actor, "ai", VIA, None, {"study": grant.study_instance_uid,
                                                     "rid": grant.request_id})


def ai_allowed(request: web.Request, principal: Principal, permission: str) -> bool:
    """Only DICOMweb routes naming the token's study in their path."""
    study = (principal.claims or {}).get("study")
    return (permission in AI_PERMISSIONS and request.path.startswith(AI_PATH)
            and bool(study) and request.match_info.get("study") == study)
