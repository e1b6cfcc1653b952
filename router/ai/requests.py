"""AI requests as the write side sees them: loading and saving ``AIRequest`` aggregates, and
preparing and sending one attempt (body, signature, scoped token, de-identification).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from projections.ai_requests_queries import request_members
from projections.db import ViewDatabase
from router.ai.deid import pseudonyms
from router.ai.outbound import Body, Member, describe, write_body
from router.ai.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER
from router.ai.tokens import AITokens
from router.application.admin_state import AdminState
from router.application.commands import Actor, CommandError, NotFoundError
from router.dispatch.ai import AIDestinationConfig, call
from router.dispatch.base import PermanentDeliveryError, TransientDeliveryError
from router.dispatch.registry import DestinationConfigError, open_config, parse_destination
from router.dispatch.ssrf import AddressPolicy, HttpAnswer
from router.domain.ai import AIRequest
from router.secrets import SecretBox
from router.storage.blobs import BlobCorruptError, BlobError, BlobStore

TOKEN_GRACE = 600.0  # the token outlives the callback deadline by this much


@dataclass(frozen=True)
class RequestRow:
    """A row of the ``ai_requests`` view table."""

    request_id: str
    destination: str
    unit_id: str
    study_instance_uid: str
    amendment: bool
    attempts: int
    clock_from: float

    @classmethod
    def of(cls, row: dict[str, Any]) -> RequestRow:
        return cls(row["request_id"], row["destination"], row["unit_id"],
                   row["study_instance_uid"], bool(row["amendment"]), int(row["attempts"]),
                   float(row["clock_from"] or 0.0))


@dataclass
class Prepared:
    """One attempt ready to go: its spooled, signed body and what it covers."""

    body: Body
    members: list[Member]
    sealed_mapping: str | None


class AIRequests:
    """Everything an attempt or a callback needs about AI requests."""

    def __init__(self, app: Any, jobs_db: ViewDatabase, admin: AdminState, blobs: BlobStore,
                 box: SecretBox, public_url: str, policy: AddressPolicy, node: str = "") -> None:
        self._app = app
        self._node = node  # recorded in each attempt's event
        self._db = jobs_db
        self._admin = admin
        self._blobs = blobs
        self._box = box
        self.public_url = public_url.rstrip("/")
        self.policy = policy  # the address policy with [ai] allowed_networks
        self.tokens = AITokens(box.derive("ai-token"))
        self._seed_key = box.derive("ai-deidentification-seed")

    def load(self, request_id: str) -> AIRequest | None:
        try:
            aggregate: Any = self._app.repository.get(UUID(request_id))
        except (AggregateNotFoundError, ValueError):
            return None
        return aggregate if isinstance(aggregate, AIRequest) else None

    def save(self, aggregate: AIRequest) -> None:
        self._app.save(aggregate)

    def config(self, destination: str) -> AIDestinationConfig:
        state = self._admin.snapshot().destinations.get(destination)
        if state is None or state.deleted:
            raise PermanentDeliveryError(f"AI destination {destination!r} no longer exists")
        try:
            config = parse_destination(open_config(state.config, self._box))
        except DestinationConfigError as exc:
            raise PermanentDeliveryError(f"AI destination config unusable: {exc}") from None
        assert isinstance(config, AIDestinationConfig)
        return config

    def callback_timeout(self, destination: str) -> float:
        try:
            return self.config(destination).callback_timeout
        except PermanentDeliveryError:
            return AIDestinationConfig.callback_timeout

    def members(self, request_id: str) -> list[Member]:
        return [Member(r["job_id"], r["sha256"], r["series_instance_uid"] or "",
                       r["sop_instance_uid"]) for r in request_members(self._db, request_id)]

    def prepare(self, row: RequestRow) -> Prepared:
        """Build and sign the body of one attempt (raises PermanentDeliveryError). Signature
        and token times are wall-clock time: the processor checks them against its own."""
        now = time.time()
        config = self.config(row.destination)
        members = self.members(row.request_id)
        if not members:
            raise PermanentDeliveryError("none of the unit's instances is in the jobs view")
        callback = f"{self.public_url}/api/v1/ai/callbacks/{row.request_id}"
        dicomweb = None
        files: list[Path] | None = None
        if config.send == "dicomweb":
            lifetime = config.callback_timeout + TOKEN_GRACE
            dicomweb = {"base_url": f"{self.public_url}/dicom-web",
                        "token": self.tokens.issue(row.destination, row.request_id,
                                                   row.study_instance_uid, lifetime, now),
                        "expires_at": int(now + lifetime)}
        else:
            files = [self._blob(m) for m in members]
        mapping: dict[str, str] | None = {} if config.deidentify else None
        seed = self._seed(row.unit_id) if config.deidentify else None
        document = describe(row.request_id, callback, row.study_instance_uid, members,
                            row.amendment, dicomweb)
        if seed is not None and mapping is not None:
            _pseudonymise(document, seed, mapping)
        body = write_body(self._blobs.spool_dir, config.secret, int(now), document, files,
                          seed, mapping)
        sealed = (self._box.seal(json.dumps(mapping), context=f"ai-deid/{row.request_id}")
                  if mapping is not None else None)
        return Prepared(body, members, sealed)

    def _blob(self, member: Member) -> Path:
        try:
            path = self._blobs.fetch(member.sha256)
        except BlobCorruptError as exc:
            raise PermanentDeliveryError(str(exc)) from None
        except BlobError as exc:
            raise TransientDeliveryError(str(exc)) from None
        if path is None:
            raise PermanentDeliveryError("a stored object of the unit is no longer kept here")
        return path

    def _seed(self, unit_id: str) -> str:
        return hmac.new(self._seed_key, unit_id.encode(), hashlib.sha256).hexdigest()

    def mapping(self, aggregate: AIRequest) -> dict[str, str] | None:
        """The pseudonym -> original mapping of a de-identified request, else None."""
        if not aggregate.reidentify:
            return None
        opened = self._box.open(aggregate.reidentify, context=f"ai-deid/{aggregate.id}")
        return dict(json.loads(opened))

    def record_request(self, aggregate: AIRequest | None, row: RequestRow, attempt: int,
                       prepared: Prepared | None, ctx: dict[str, str]) -> AIRequest:
        """Save ``Requested`` (first attempt) or ``Resent`` before the POST."""
        if aggregate is None:
            members = prepared.members if prepared else self.members(row.request_id)
            config_send = self._send_mode(row.destination)
            aggregate = AIRequest(
                row.request_id, **ctx, destination=row.destination, unit_id=row.unit_id,
                study_instance_uid=row.study_instance_uid,
                series_instance_uids=sorted({m.series_instance_uid for m in members}),
                job_ids=[m.job_id for m in members], amendment=row.amendment,
                send=config_send, deidentified=bool(prepared and prepared.sealed_mapping),
                reidentify=prepared.sealed_mapping if prepared else None, node=self._node)
        else:
            aggregate.resend(**ctx, attempt=attempt, node=self._node)
        self.save(aggregate)
        return aggregate

    def requeue(self, request_id: str, actor: Actor) -> None:
        """An operator's new attempt now (CommandError unless dead or waiting to retry)."""
        aggregate = self.load(request_id)
        if aggregate is None:
            raise NotFoundError("no AI request with this id")
        if aggregate.status not in ("dead", "retrying"):
            raise CommandError(f"the request is {aggregate.status}; nothing to requeue")
        aggregate.requeue(**actor.ctx())
        self.save(aggregate)

    def _send_mode(self, destination: str) -> str:
        try:
            return self.config(destination).send
        except PermanentDeliveryError:
            return ""

    def post(self, row: RequestRow, prepared: Prepared) -> HttpAnswer:
        config = self.config(row.destination)
        body = prepared.body
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.size),
                   TIMESTAMP_HEADER: str(body.timestamp), SIGNATURE_HEADER: body.signature}
        with body.path.open("rb") as stream:
            return call(config, stream, headers, self.policy)


def _pseudonymise(document: dict[str, Any], seed: str, mapping: dict[str, str]) -> None:
    """Replace the UIDs the JSON names by the pseudonyms the de-identified files carry."""
    keys = ("series_instance_uids", "sop_instance_uids")
    uids = [document["study_instance_uid"], *(u for key in keys for u in document[key])]
    replaced = pseudonyms(seed, uids)
    document["study_instance_uid"] = replaced[document["study_instance_uid"]]
    for key in keys:
        document[key] = [replaced[u] for u in document[key]]
    mapping.update({f"UI:{new}": old for old, new in replaced.items()})
