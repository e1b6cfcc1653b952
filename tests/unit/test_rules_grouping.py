"""Series- and study-level keys of a rule: parsing, defaults, round trip, errors, and how a
routing decision becomes held units (rule keys first, then an ai destination's defaults)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from router.application.admin_state import AdminSnapshot, DestinationState
from router.application.unit_plan import plan_units
from router.domain.grouping import Grouping
from router.domain.rules import RoutingInput, RuleError, VersionedRule, evaluate, parse_rule


def test_grouping_keys_parse_and_round_trip() -> None:
    spec = parse_rule({"name": "r", "destinations": ["a"], "granularity": "study",
                       "quiet_time": "3m", "expected_count": 20, "amendments": "whole_unit"})
    assert (spec.granularity, spec.quiet_time, spec.expected_count) == ("study", 180.0, 20)
    assert parse_rule(spec.to_dict()) == spec


def test_a_rule_without_grouping_keeps_its_older_stored_form() -> None:
    spec = parse_rule({"name": "r", "destinations": ["a"]})
    assert not {"granularity", "quiet_time", "expected_count", "amendments"} & set(
        spec.to_dict())


@pytest.mark.parametrize(("key", "value"), [
    ("granularity", "patient"), ("quiet_time", "soon"), ("quiet_time", -1),
    ("expected_count", 0), ("expected_count", True), ("amendments", "all")])
def test_bad_grouping_values_name_their_key(key: str, value: object) -> None:
    with pytest.raises(RuleError, match=key):
        parse_rule({"name": "r", "destinations": ["a"], key: value})


def test_default_quiet_times() -> None:
    assert Grouping.resolve({"granularity": "series"}, {}).quiet_time == 60.0
    assert Grouping.resolve({}, {"granularity": "study"}).quiet_time == 180.0
    assert Grouping.resolve({"quiet_time": 5.0}, {"granularity": "study"}).quiet_time == 5.0


def _dataset() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2", "1.2.3", "1.2.3.4"
    ds.Modality = "CT"
    return ds


def test_held_units_follow_the_first_matching_rule_then_the_ai_default() -> None:
    rules = tuple(VersionedRule(f"id{i}", 1, parse_rule(data)) for i, data in enumerate([
        {"name": "a", "priority": 1, "destinations": ["pacs", "lungai"]},
        {"name": "b", "priority": 2, "destinations": ["archive"], "granularity": "series"},
    ]))
    destinations = {
        "lungai": DestinationState("lungai", "x", 1, {"type": "ai", "granularity": "study"},
                                   False, False),
        "pacs": DestinationState("pacs", "y", 1, {"type": "dicom"}, False, False),
    }
    snapshot = AdminSnapshot(rules=rules, destinations=destinations)
    decision = evaluate(rules, RoutingInput("CT", "R", "127.0.0.1", _dataset()))
    units = {u["destination"]: u for u in plan_units(snapshot, decision,
                                                     decision.destinations, _dataset())}
    assert set(units) == {"lungai", "archive"}  # pacs: per instance, not held
    assert (units["lungai"]["granularity"], units["lungai"]["quiet_time"]) == ("study", 180.0)
    assert (units["archive"]["granularity"], units["archive"]["series_instance_uid"]) == (
        "series", "1.2.3")
