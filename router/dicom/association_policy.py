"""Which A-ASSOCIATE-RQs the router refuses outright, and with which A-ASSOCIATE-RJ fields
(PS3.8 9.3.4, table 9-21). Decided by the front door before any thread or slot is spent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from router.dicom import pdus

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd integers 1 to 255

# result: 1 rejected-permanent, 2 rejected-transient. source: 1 service-user, 2 service-provider
# (ACSE), 3 service-provider (presentation).
PERMANENT, TRANSIENT = 1, 2
USER, ACSE, PRESENTATION = 1, 2, 3


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send, and why (for the log; no PHI)."""

    result: int
    source: int
    reason: int
    why: str

    def pdu(self) -> bytes:
        return pdus.encode_associate_rj(self.result, self.source, self.reason)


LOCAL_LIMIT = (TRANSIENT, PRESENTATION, 2)  # "local-limit-exceeded"


def over_limit(why: str) -> Rejection:
    return Rejection(*LOCAL_LIMIT, why=why)


@dataclass(frozen=True)
class AssociationPolicy:
    """What the settings allow (``known_calling_aets`` None: any calling AE)."""

    ae_title: str
    require_called_aet: bool
    known_calling_aets: frozenset[str] | None


def check(body: bytes, request: pdus.AssociateRequest,
          policy: AssociationPolicy) -> Rejection | None:
    """The rejection for this request (``body`` is the A-ASSOCIATE-RQ after its PDU header),
    or None when it may proceed."""
    version = struct.unpack_from(">H", body, 0)[0]
    if not version & 1:
        return Rejection(PERMANENT, ACSE, 2, "protocol version not supported")
    if request.application_context != pdus.APPLICATION_CONTEXT:
        return Rejection(PERMANENT, USER, 2, "application context name not supported")
    if policy.require_called_aet and request.called_aet != policy.ae_title:
        return Rejection(PERMANENT, USER, 7, "called AE title not recognised")
    if policy.known_calling_aets is not None and (
            request.calling_aet not in policy.known_calling_aets):
        return Rejection(PERMANENT, USER, 3, "calling AE title not recognised")
    problem = _contexts_problem(request.contexts)
    if problem:
        return Rejection(PERMANENT, USER, 1, problem)
    return None


def _contexts_problem(contexts: tuple[pdus.ProposedContext, ...]) -> str:
    if not contexts:
        return "no presentation context proposed"
    if len(contexts) > MAX_CONTEXTS:
        return f"{len(contexts)} presentation contexts proposed (at most {MAX_CONTEXTS})"
    ids = [c.context_id for c in contexts]
    if any(i % 2 == 0 for i in ids):
        return "a presentation context ID is even"
    if len(set(ids)) != len(ids):
        return "presentation context IDs are not unique"
    if any(not c.abstract_syntax or not c.transfer_syntaxes for c in contexts):
        return "a presentation context lacks its abstract or transfer syntax"
    return ""
