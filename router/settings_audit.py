"""The ``[atna]`` and ``[audit]`` settings: where audit messages go (DICOM PS3.15 A.5, syslog
over TLS or UDP) and how long the audit trail is kept.

Kept out of router/settings.py, which composes them like any other section.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from router.config_types import SECTION, Duration, FieldProblem, UserPath, ints

# HIPAA asks for six years (45 CFR 164.316(b)(2)); 6 x 365 + 2 leap days.
SIX_YEARS_DAYS = 2192
_APP_NAME = re.compile(r"^[\x21-\x7e]{1,48}$")  # RFC 5424 APP-NAME: PRINTUSASCII, 1*48
_SOURCE_ID = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,63}$")


@dataclasses.dataclass(frozen=True)
class AtnaSettings:
    """Audit messages to an audit record repository (docs/atna.md); off while host is empty."""

    __pydantic_config__ = SECTION

    host: str = ""
    port: Annotated[int, ints(1, 65535)] = 6514  # RFC 5425's port; UDP's is usually 514
    transport: Literal["tls", "udp"] = "tls"
    # TLS: the CA bundle the repository's certificate must chain to (required), and our own
    # certificate and key when the repository asks for one (mutual TLS, IHE ATNA).
    ca_certificates: UserPath | None = None
    certificate: UserPath | None = None
    private_key: UserPath | None = None
    app_name: str = "dicom-router"  # RFC 5424 APP-NAME
    # AuditSourceIdentification: AuditSourceID (empty: the router's AE title) and
    # AuditEnterpriseSiteID (empty: left out).
    audit_source_id: str = ""
    enterprise_site_id: str = ""
    batch_size: Annotated[int, ints(1, 5000)] = 200  # rows per send (the at-least-once window)
    retry_max: Duration = 60.0  # backoff after a failed send doubles from 1 s up to this
    timeout: Duration = 10.0  # connect, send and the repository's close

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        if not _APP_NAME.match(self.app_name):
            problems["app_name"] = "must be 1-48 printable ASCII characters without spaces"
        for key in ("audit_source_id", "enterprise_site_id"):
            value = getattr(self, key)
            if value and not _SOURCE_ID.match(value):
                problems[key] = "must be 1-64 printable ASCII characters"
        if self.enabled and self.transport == "tls" and self.ca_certificates is None:
            problems["ca_certificates"] = ("required by transport = \"tls\" (the CA bundle the "
                                           "audit repository's certificate must chain to)")
        if (self.certificate is None) != (self.private_key is None):
            missing = "private_key" if self.private_key is None else "certificate"
            problems[missing] = "certificate and private_key go together"
        if self.transport == "udp" and self.certificate is not None:
            problems["certificate"] = "only used with transport = \"tls\""
        if problems:
            raise FieldProblem(problems)


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """How long the audit trail is kept: its own setting, apart from image retention."""

    __pydantic_config__ = SECTION

    # Days the audit trail (the event logs and the audit view) must be kept; 0: forever.
    retention_days: Annotated[int, ints(0, 36500)] = SIX_YEARS_DAYS
    # Less than six years only with this set (a site whose own policy is shorter).
    allow_short_retention: bool = False

    def __post_init__(self) -> None:
        if (0 < self.retention_days < SIX_YEARS_DAYS and not self.allow_short_retention):
            raise FieldProblem({"retention_days": (
                f"must be at least {SIX_YEARS_DAYS} days (6 years, HIPAA) or 0 (forever); "
                "set allow_short_retention = true to keep it shorter")})
