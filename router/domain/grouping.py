"""Series- and study-level routing: how a rule (or an ``ai`` destination, as its default) groups
instances into units that are sent together once stable or complete.

Pure values and their validation; the scheduler that dispatches units is
:mod:`router.dispatch.units`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from uuid import NAMESPACE_OID, UUID, uuid5

from router.config_types import seconds_of

GRANULARITIES = ("instance", "series", "study")
AMENDMENTS = ("late_only", "whole_unit")
DEFAULT_QUIET_TIME = {"instance": 0.0, "series": 60.0, "study": 180.0}
MAX_QUIET_TIME = 7 * 86400.0
MAX_EXPECTED_COUNT = 1_000_000
UNIT_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/unit")
GROUPING_KEYS = ("granularity", "quiet_time", "expected_count", "amendments")


class GroupingError(ValueError):
    """A grouping key is invalid; ``str()`` is ``"<key>: <problem>"``."""


def duration_seconds(value: object, key: str) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"2h"``; raises :class:`GroupingError`."""
    try:
        seconds = seconds_of(value)
    except ValueError as exc:
        raise GroupingError(f"{key}: {exc}") from None
    if not 0 <= seconds <= MAX_QUIET_TIME:
        raise GroupingError(f"{key}: must be between 0 s and 7 days")
    return seconds


def check_grouping(granularity: object, quiet_time: object, expected_count: object,
                   amendments: object) -> None:
    """Raise :class:`GroupingError` for the first unusable value (None means "not set")."""
    if granularity is not None and granularity not in GRANULARITIES:
        raise GroupingError(f"granularity: expected one of {', '.join(GRANULARITIES)}, "
                            f"got {granularity!r}")
    if quiet_time is not None:
        duration_seconds(quiet_time, "quiet_time")
    if expected_count is not None and (
            isinstance(expected_count, bool) or not isinstance(expected_count, int)
            or not 1 <= expected_count <= MAX_EXPECTED_COUNT):
        raise GroupingError(f"expected_count: expected a whole number from 1 to "
                            f"{MAX_EXPECTED_COUNT}, got {expected_count!r}")
    if amendments not in AMENDMENTS:
        raise GroupingError(f"amendments: expected one of {', '.join(AMENDMENTS)}, "
                            f"got {amendments!r}")


@dataclass(frozen=True)
class Grouping:
    """How one destination's instances are grouped for one routing decision."""

    granularity: str = "instance"
    quiet_time: float = 0.0
    expected_count: int | None = None
    amendments: str = "late_only"

    @classmethod
    def resolve(cls, rule: Mapping[str, object], default: Mapping[str, object]) -> Grouping:
        """The rule's keys, else the destination's defaults, else the granularity's default."""
        def pick(key: str) -> object:
            value = rule.get(key)
            return default.get(key) if value is None else value

        granularity = str(pick("granularity") or "instance")
        quiet = pick("quiet_time")
        count = pick("expected_count")
        return cls(
            granularity=granularity,
            quiet_time=(duration_seconds(quiet, "quiet_time") if quiet is not None
                        else DEFAULT_QUIET_TIME.get(granularity, 0.0)),
            expected_count=int(count) if isinstance(count, int) else None,
            amendments=str(pick("amendments") or "late_only"),
        )


def unit_key(destination: str, granularity: str, study: str, series: str | None,
             instance: str | None) -> str:
    """What identifies a unit: destination, granularity and the UIDs at that level."""
    if granularity == "study":
        return f"{destination}/study/{study}"
    if granularity == "series":
        return f"{destination}/series/{study}/{series}"
    return f"{destination}/instance/{study}/{series}/{instance}"


def unit_id(key: str) -> UUID:
    return uuid5(UNIT_NAMESPACE, key)
