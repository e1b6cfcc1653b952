"""Query-string filters of the jobs, transfers and studies pages and API: bounded text, UIDs,
dates and instants parsed into the typed filters the queries in projections/ take, and the one
error type that names the bad field; ISO 8601 times in API answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from projections import jobs_queries, studies_queries, transfers_queries
from projections.jobs_queries import JOB_STATUSES, JobFilters
from projections.sql import search_name
from projections.studies_queries import StudyFilters
from projections.transfers_queries import TransferFilters
from router.application.bulk import BulkFilterError, parse_instant
from router.domain.delivery_states import canonical

MAX_TEXT = 128  # no identifier or name we index is longer (PN components are 64 chars)
UID_RE = re.compile(r"^[0-9.]{1,64}$")
PAGING_FIELDS = ("limit", "offset")


class FilterError(ValueError):
    """A filter value cannot be used; ``field`` names it and the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_known(query: Mapping[str, str], known: Iterable[str]) -> None:
    """Refuse parameters nobody reads (a misspelt filter would silently match everything)."""
    allowed = set(known)
    for key in query:
        if key not in allowed:
            raise FilterError(key, "unknown parameter; known: " + ", ".join(sorted(allowed)))


def text(query: Mapping[str, str], field: str, limit: int = MAX_TEXT) -> str | None:
    """A stripped, bounded text value, or None when absent or empty."""
    value = query.get(field, "").strip()
    if not value:
        return None
    if len(value) > limit:
        raise FilterError(field, f"at most {limit} characters")
    if any(ord(ch) < 0x20 for ch in value):
        raise FilterError(field, "control characters are not allowed")
    return value


def uid(query: Mapping[str, str], field: str) -> str | None:
    value = text(query, field, 64)
    if value is not None and not UID_RE.match(value):
        raise FilterError(field, "a DICOM UID is digits and dots, at most 64 characters")
    return value


def choice(query: Mapping[str, str], field: str, allowed: Iterable[str]) -> str | None:
    value = text(query, field)
    options = tuple(allowed)
    if value is not None and value not in options:
        raise FilterError(field, "must be one of " + ", ".join(options))
    return value


def instant(query: Mapping[str, str], field: str, end_of_day: bool = False) -> float | None:
    """Unix seconds from ``YYYY-MM-DD`` or an ISO 8601 date-time (UTC unless it says).

    A bare date as an upper bound means the end of that day.
    """
    value = text(query, field, 40)
    if value is None:
        return None
    try:
        return parse_instant(value, field, end_of_day)
    except BulkFilterError as exc:
        raise FilterError(field, exc.message) from None


def dicom_date(query: Mapping[str, str], field: str) -> str | None:
    """A DICOM DA value (YYYYMMDD) from ``YYYY-MM-DD`` or ``YYYYMMDD``."""
    value = text(query, field, 10)
    if value is None:
        return None
    digits = value.replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(value)
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise FilterError(field, "expected a date, YYYY-MM-DD or YYYYMMDD") from None
    return digits


def job_filters(query: Mapping[str, str], strict: bool = True) -> JobFilters:
    """Jobs list filters from a query string; :class:`FilterError` names a bad or unknown
    field (``strict``: any parameter that is neither a filter nor paging)."""
    if strict:
        check_known(query, jobs_queries.FILTER_FIELDS + PAGING_FIELDS)
    modality = text(query, "modality", 16)
    filters = JobFilters(
        status=status_choice(query, JOB_STATUSES),
        destination=text(query, "destination", 64),
        calling_aet=text(query, "calling_aet", 16),
        modality=modality.upper() if modality else None,
        received_from=instant(query, "received_from"),
        received_to=instant(query, "received_to", end_of_day=True),
        patient_id=text(query, "patient_id", 64),
        study_uid=uid(query, "study_uid"),
    )
    _check_received(filters.received_from, filters.received_to)
    return filters


def _check_received(received_from: float | None, received_to: float | None) -> None:
    if received_from is not None and received_to is not None and received_from >= received_to:
        raise FilterError("received_to", "must be after received_from")


def transfer_filters(query: Mapping[str, str], strict: bool = True) -> TransferFilters:
    """Transfers list filters from a query string (as :func:`job_filters`)."""
    if strict:
        check_known(query, transfers_queries.FILTER_FIELDS + PAGING_FIELDS)
    filters = TransferFilters(
        status=status_choice(query, JOB_STATUSES),
        destination=text(query, "destination", 64),
        calling_aet=text(query, "calling_aet", 16),
        received_from=instant(query, "received_from"),
        received_to=instant(query, "received_to", end_of_day=True),
        patient_id=text(query, "patient_id", 64),
        study_uid=uid(query, "study_uid"),
    )
    _check_received(filters.received_from, filters.received_to)
    return filters


def study_filters(query: Mapping[str, str], strict: bool = True) -> StudyFilters:
    """Study search filters from a query string (as :func:`job_filters`)."""
    if strict:
        check_known(query, studies_queries.FILTER_FIELDS + PAGING_FIELDS)
    modality = text(query, "modality", 16)
    filters = StudyFilters(
        patient_name=search_name(name) if (name := text(query, "patient_name")) else None,
        patient_id=text(query, "patient_id", 64),
        study_date_from=dicom_date(query, "study_date_from"),
        study_date_to=dicom_date(query, "study_date_to"),
        modality=modality.upper() if modality else None,
        accession_number=text(query, "accession_number", 16),
        description=text(query, "description", 64),
        study_uid=uid(query, "study_uid"),
    )
    if (filters.study_date_from and filters.study_date_to
            and filters.study_date_from > filters.study_date_to):
        raise FilterError("study_date_to", "must not be before study_date_from")
    return filters


def status_choice(query: Mapping[str, str], allowed: tuple[str, ...]) -> str | None:
    """The ``status`` filter under its current name (old names are aliases: ``dead`` and
    ``dead-lettered`` for ``failed``, ``pending`` for ``queued``)."""
    value = text(query, "status")
    if value is None:
        return None
    return choice({"status": canonical(value)}, "status", allowed)


def iso(timestamp: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC string (what the API answers with)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat(timespec="milliseconds"
                                                                    ).replace("+00:00", "Z")


def with_iso_times(value: Any) -> Any:
    """``value`` with every ``*_at`` field (Unix seconds) as an ISO 8601 string, recursively."""
    if isinstance(value, dict):
        return {k: (iso(v) if k.endswith("_at") and isinstance(v, int | float) else
                    with_iso_times(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [with_iso_times(v) for v in value]
    return value
