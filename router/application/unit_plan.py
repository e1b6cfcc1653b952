"""Which destinations of a routing decision wait for their series or study unit.

For each destination, the first matching rule (in evaluation order) that names it decides its
grouping; keys it leaves unset come from the destination's own config (``ai`` destinations
default to study level). ``ai`` destinations always go through a unit, even per instance,
because an AI request is made for a unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydicom.dataset import Dataset

from router.application.admin_state import AdminSnapshot
from router.domain.grouping import GROUPING_KEYS, Grouping, unit_id, unit_key
from router.domain.rules import RoutingDecision, VersionedRule


def _rule_keys(rules: Sequence[VersionedRule], decision: RoutingDecision,
               destination: str) -> Mapping[str, object]:
    by_id = {r.rule_id: r for r in rules}
    for match in decision.matched:
        rule = by_id.get(match.rule_id)
        if rule is not None and destination in rule.spec.destinations:
            return {key: getattr(rule.spec, key) for key in GROUPING_KEYS}
    return {}


def _text(dataset: Dataset | Mapping[str, Any], keyword: str) -> str:
    value = dataset.get(keyword)
    return str(value).strip() if value is not None else ""


def plan_units(snapshot: AdminSnapshot, decision: RoutingDecision, destinations: Sequence[str],
               dataset: Dataset | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``units`` entries of a ``Job.Routed`` event: one per held destination.

    ``dataset`` is the header, or its index attributes (the receive path: no conversion).
    """
    study = _text(dataset, "StudyInstanceUID")
    series = _text(dataset, "SeriesInstanceUID")
    sop = _text(dataset, "SOPInstanceUID")
    units: list[dict[str, Any]] = []
    for name in destinations:
        state = snapshot.destinations.get(name)
        config: Mapping[str, object] = state.config if state is not None else {}
        is_ai = config.get("type") == "ai"
        grouping = Grouping.resolve(_rule_keys(snapshot.rules, decision, name),
                                    config if is_ai else {})
        level = grouping.granularity
        if level == "series" and not series:
            level = "instance"  # nothing to group by: sent on its own
        if not study and level != "instance":
            level = "instance"
        if level == "instance" and not is_ai:
            continue
        key = unit_key(name, level, study, series, sop)
        units.append({
            "destination": name, "unit_id": str(unit_id(key)), "granularity": level,
            "study_instance_uid": study, "series_instance_uid": series or None,
            "quiet_time": grouping.quiet_time if level != "instance" else 0.0,
            "expected_count": grouping.expected_count if level != "instance" else 1,
            "amendments": grouping.amendments,
        })
    return units
