"""Destination kind ``ai``: an AI processor reached over signed HTTPS, one request per series
or study. The config is declared like any destination; requests are made by the AI worker
(router.ai.worker), not by the per-instance lanes, so the adapter only checks (a signed ping).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import time
import uuid
from typing import Annotated, BinaryIO
from urllib.parse import urlsplit

from router.ai.signing import signed_headers
from router.config_types import (
    STRICT,
    Concurrency,
    Description,
    DestinationName,
    Doc,
    Duration,
    StrictBool,
    StrictInt,
)
from router.dispatch.base import (
    Outgoing,
    PermanentDeliveryError,
    RefusedAddressError,
    TransientDeliveryError,
    UnreachableError,
)
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError, HttpAnswer, post
from router.domain.grouping import GroupingError, check_grouping

SEND_MODES = ("dicomweb", "files")
MIN_SECRET = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class AIDestinationConfig:
    """An AI processor: where to POST, the shared secret, what to send and how long to wait."""

    __pydantic_config__ = STRICT

    name: DestinationName
    url: Annotated[str, Doc("where requests are POSTed: an http:// or https:// URL")]
    secret: Annotated[str, Doc("shared secret the requests are signed with (HMAC-SHA256), at "
                               "least 16 characters; write-only")]
    send: Annotated[str, Doc("dicomweb (it reads the study from us with a token) or files "
                             "(sent in the request)")] = "dicomweb"
    callback_timeout: Annotated[Duration, Doc(
        "how long a result may take: 1 minute to 7 days")] = 7200.0
    granularity: Annotated[str, Doc("what one request covers: instance, series or study "
                                    "(the default of rules routing here)")] = "study"
    quiet_time: Annotated[Duration | None, Doc(
        "how long a series or study stays unchanged before it is sent; empty: the "
        "granularity's default")] = None
    expected_count: Annotated[StrictInt | None, Doc(
        "send as soon as this many instances arrived")] = None
    deidentify: Annotated[StrictBool, Doc(
        "send de-identified files (needs send = files)")] = False
    request_timeout: Annotated[Duration, Doc("one request's timeout: 1 s to 10 min")] = 30.0
    concurrency: Concurrency = 2
    enabled: StrictBool = True
    description: Description = ""

    def problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems["url"] = "must be an http:// or https:// URL with a host"
        elif parts.username or parts.password:
            problems["url"] = "must not carry a user name or password"
        if len(self.secret) < MIN_SECRET:
            problems["secret"] = f"must be at least {MIN_SECRET} characters"
        if self.send not in SEND_MODES:
            problems["send"] = "must be 'dicomweb' or 'files'"
        elif self.deidentify and self.send != "files":
            problems["deidentify"] = ("needs send = 'files': over DICOMweb the processor would "
                                      "read the identified study")
        if not 60 <= self.callback_timeout <= 7 * 86400:
            problems["callback_timeout"] = "must be between 1 minute and 7 days"
        if not 1 <= self.request_timeout <= 600:
            problems["request_timeout"] = "must be between 1 s and 10 min"
        try:
            check_grouping(self.granularity, self.quiet_time, self.expected_count, "late_only")
        except GroupingError as exc:
            key, _, message = str(exc).partition(": ")
            problems[key] = message
        return problems


def describe_answer(answer: HttpAnswer) -> str:
    """A short, PHI-free description of a refusal."""
    if 300 <= answer.status < 400:
        return f"HTTP {answer.status}: redirects are not followed"
    return f"HTTP {answer.status}"


def call(config: AIDestinationConfig, body: bytes | BinaryIO, headers: dict[str, str],
         policy: AddressPolicy) -> HttpAnswer:
    """POST a signed body (``headers`` carry the signature) through the address policy;
    errors become Transient or Permanent delivery errors (redirects and other 4xx are
    permanent)."""
    headers = {"User-Agent": "dicom-router", **headers}
    try:
        answer = post(config.url, body, headers, config.request_timeout, policy)
    except AddressRefusedError as exc:
        raise RefusedAddressError(str(exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        # No HTTP answer at all (a closed port, or one speaking something else).
        raise UnreachableError(f"AI processor unreachable: {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from None
    if 200 <= answer.status < 300:
        return answer
    message = f"AI processor answered {describe_answer(answer)}"
    if answer.status in (408, 425, 429) or answer.status >= 500:
        raise TransientDeliveryError(message)
    raise PermanentDeliveryError(message)


class AIAdapter:
    """The ``check`` of an AI destination: a signed ``{"ping": true}`` answered with 2xx."""

    def __init__(self, config: AIDestinationConfig, *, policy: AddressPolicy) -> None:
        self._config = config
        self._policy = policy

    def send(self, item: Outgoing) -> str:
        raise PermanentDeliveryError("AI processors are sent whole series or studies by the "
                                     "AI worker, not single instances")

    def check(self) -> str:
        body = json.dumps({"ping": True, "correlation_id": f"ping-{uuid.uuid4()}"}).encode()
        started = time.monotonic()
        headers = {"Content-Type": "application/json",
                   **signed_headers(self._config.secret, body, time.time())}
        answer = call(self._config, body, headers, self._policy)
        return f"answered HTTP {answer.status} in {int((time.monotonic() - started) * 1000)} ms"

    def close(self) -> None:
        """Nothing to release: each request opens and closes its connection."""
