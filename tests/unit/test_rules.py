"""Routing rules: parsing, every operator, header criteria, ordering with stop, explanations."""

from __future__ import annotations

import json
import pickle
import re
import tomllib
import warnings
from collections.abc import Mapping
from datetime import date, time

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from router.domain.rules import (
    Condition,
    ConditionError,
    ConditionResult,
    RoutingDecision,
    RoutingInput,
    RuleError,
    RuleMatch,
    RuleSpec,
    VersionedRule,
    evaluate,
    explain,
    parse_condition,
    parse_rule,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def ct() -> Dataset:
    """CT_small.dcm header: Modality CT, ImageType ORIGINAL\\PRIMARY\\AXIAL, GE private tags."""
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    return pydicom.dcmread(path, stop_before_pixels=True)


def synthetic(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def malformed(**elements: object) -> Dataset:
    """A dataset holding invalid values as a careless modality would send them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return synthetic(**elements)


def routing_input(
    dataset: Dataset,
    *,
    calling: str = "CT_1",
    called: str = "DICOMROUTER",
    ip: str = "10.1.2.3",
    extra: Mapping[str, object] | None = None,
) -> RoutingInput:
    return RoutingInput(calling, called, ip, dataset, extra or {})


def rule(**fields: object) -> RuleSpec:
    return parse_rule({"name": "r", "destinations": ["pacs"], **fields})


def holds(
    dataset: Dataset,
    tag: str,
    op: str,
    value: object = None,
    *,
    case_sensitive: bool | None = None,
    extra: Mapping[str, object] | None = None,
) -> bool:
    """Whether one condition (``value`` omitted when None) matches ``dataset``."""
    condition: dict[str, object] = {"tag": tag, "op": op}
    if value is not None:
        condition["value"] = value
    if case_sensitive is not None:
        condition["case_sensitive"] = case_sensitive
    return rule(match=[condition]).matches(routing_input(dataset, extra=extra))


# -- string operators ----------------------------------------------------------------------------


def test_eq_matches_the_exact_value_case_sensitively_by_default(ct: Dataset) -> None:
    assert holds(ct, "Modality", "eq", "CT")
    assert not holds(ct, "Modality", "eq", "ct")
    assert holds(ct, "Modality", "eq", "ct", case_sensitive=False)


def test_eq_on_a_multi_valued_element_matches_any_value_or_the_whole(ct: Dataset) -> None:
    assert holds(ct, "ImageType", "eq", "AXIAL")
    assert holds(ct, "ImageType", "eq", "ORIGINAL\\PRIMARY\\AXIAL")
    assert not holds(ct, "ImageType", "eq", "LOCALIZER")


def test_ne_matches_when_no_value_equals_including_a_missing_element(ct: Dataset) -> None:
    assert holds(ct, "Modality", "ne", "MR")
    assert not holds(ct, "Modality", "ne", "CT")
    assert not holds(ct, "ImageType", "ne", "PRIMARY")
    assert holds(ct, "ImageType", "ne", "LOCALIZER")
    assert holds(ct, "BodyPartExamined", "ne", "CHEST")


def test_in_matches_when_any_value_is_listed(ct: Dataset) -> None:
    assert holds(ct, "Modality", "in", ["MR", "CT"])
    assert holds(ct, "ImageType", "in", ["SECONDARY", "AXIAL"])
    assert not holds(ct, "Modality", "in", ["mr", "ct"])
    assert holds(ct, "Modality", "in", ["mr", "ct"], case_sensitive=False)


def test_contains_and_startswith_compare_person_names_on_their_string_form(ct: Dataset) -> None:
    assert holds(ct, "PatientName", "eq", "CompressedSamples^CT1")
    assert holds(ct, "PatientName", "contains", "Samples^CT")
    assert holds(ct, "PatientName", "startswith", "Compressed")
    assert not holds(ct, "PatientName", "startswith", "Samples")
    assert holds(ct, "PatientName", "startswith", "COMPRESSED", case_sensitive=False)


def test_startswith_on_uids_and_contains_on_multi_valued_elements(ct: Dataset) -> None:
    assert holds(ct, "SOPClassUID", "startswith", "1.2.840.10008.5.1.4.1.1.")
    assert holds(ct, "ImageType", "contains", "PRIM")
    assert not holds(ct, "ImageType", "contains", "SECOND")


def test_regex_searches_each_value_and_honours_case_sensitivity(ct: Dataset) -> None:
    assert holds(ct, "ImageType", "regex", r"^AX")
    assert holds(ct, "PatientName", "regex", r"CT\d$")
    assert not holds(ct, "PatientName", "regex", r"^compressed")
    assert holds(ct, "PatientName", "regex", r"^compressed", case_sensitive=False)


def test_string_operators_never_match_a_missing_element(ct: Dataset) -> None:
    for op, value in [("eq", "X"), ("in", ["X"]), ("contains", "X"), ("startswith", "X")]:
        assert not holds(ct, "BodyPartExamined", op, value)
    assert not holds(ct, "BodyPartExamined", "regex", ".*")


# -- exists ------------------------------------------------------------------------------------


def test_exists_means_present_and_non_empty(ct: Dataset) -> None:
    assert holds(ct, "Modality", "exists")
    assert holds(ct, "Modality", "exists", True)
    assert not holds(ct, "PatientBirthDate", "exists")  # present but empty in CT_small
    assert holds(ct, "PatientBirthDate", "exists", False)
    assert holds(ct, "BodyPartExamined", "exists", False)
    assert not holds(ct, "BodyPartExamined", "exists", True)


def test_exists_on_sequences_counts_items() -> None:
    ds = synthetic(ReferencedImageSequence=[])
    assert not holds(ds, "ReferencedImageSequence", "exists")
    ds.ReferencedImageSequence = [Dataset()]
    assert holds(ds, "ReferencedImageSequence", "exists")


# -- numbers -----------------------------------------------------------------------------------


def test_numeric_orderings_on_us_ds_and_is_values(ct: Dataset) -> None:
    assert holds(ct, "Rows", "gt", 100)  # US 128
    assert holds(ct, "Rows", "ge", 128)
    assert not holds(ct, "Rows", "lt", 128)
    assert holds(ct, "Rows", "le", "128")
    assert holds(ct, "SliceThickness", "le", 5)  # DS "5.000000"
    assert not holds(ct, "SliceThickness", "lt", 5.0)
    assert holds(ct, "InstanceNumber", "lt", 2)  # IS "1"


def test_numeric_ordering_matches_when_any_value_of_a_multi_valued_element_does(
    ct: Dataset,
) -> None:
    assert holds(ct, "PixelSpacing", "lt", 0.7)
    assert holds(ct, "(0043,1018)", "gt", 1)  # private DS 0.085\1.102\0.095
    assert not holds(ct, "(0043,1018)", "gt", 2)


def test_numeric_equality_compares_numbers_on_numeric_elements(ct: Dataset) -> None:
    assert holds(ct, "Rows", "eq", 128)
    assert holds(ct, "Rows", "eq", "128")
    assert holds(ct, "SliceThickness", "eq", 5)
    assert holds(ct, "SliceThickness", "in", ["4", "5.0"])
    assert not holds(ct, "SliceThickness", "ne", 5)


def test_string_equality_keeps_leading_zeros_of_identifiers() -> None:
    ds = synthetic(AccessionNumber="00123")
    assert not holds(ds, "AccessionNumber", "eq", "123")
    assert holds(ds, "AccessionNumber", "eq", "00123")
    assert holds(ds, "AccessionNumber", "eq", 123)  # a number in the rule asks for numbers


def test_values_that_cannot_be_compared_do_not_match_and_do_not_raise(ct: Dataset) -> None:
    ds = malformed(StudyDate="2024", StudyTime="99", AcquisitionDateTime="garbage")
    ds.add_new(0x00091010, "LO", "abc")
    assert not holds(ds, "(0009,1010)", "gt", 5)
    assert not holds(ds, "StudyDate", "gt", "20000101")
    assert not holds(ds, "StudyTime", "lt", "120000")
    assert not holds(ds, "AcquisitionDateTime", "lt", "2030")
    assert not holds(ct, "PatientName", "gt", 1)


# -- dates and times ----------------------------------------------------------------------------


def test_da_values_compare_as_dates_in_either_spelling(ct: Dataset) -> None:
    assert holds(ct, "StudyDate", "gt", "20040101")  # 20040119
    assert holds(ct, "StudyDate", "gt", "2004-01-01")
    assert holds(ct, "StudyDate", "le", "2004-01-19")
    assert not holds(ct, "StudyDate", "lt", "2004-01-19")
    assert holds(ct, "SeriesDate", "lt", date(2000, 1, 1))  # a TOML date
    assert holds(malformed(StudyDate="2004.01.19"), "StudyDate", "eq", "2004.01.19")


def test_tm_values_compare_as_times_including_partial_and_fractional_values(
    ct: Dataset,
) -> None:
    assert holds(ct, "StudyTime", "gt", "07:00")  # 072730
    assert holds(ct, "StudyTime", "lt", "0728")
    assert holds(ct, "StudyTime", "ge", time(7, 27, 30))
    ds = synthetic(StudyTime="072730.5", SeriesTime="07")
    assert holds(ds, "StudyTime", "gt", "072730")
    assert holds(ds, "SeriesTime", "lt", "070001")
    assert holds(ds, "SeriesTime", "ge", "07:00:00")


def test_dt_values_compare_as_datetimes_with_offsets_when_both_have_one() -> None:
    ds = synthetic(AcquisitionDateTime="20240101103000.123+0100")
    assert holds(ds, "AcquisitionDateTime", "gt", "2024-01-01T09:00:00+00:00")  # 09:30 UTC
    assert not holds(ds, "AcquisitionDateTime", "gt", "2024-01-01T09:45:00+00:00")
    assert holds(ds, "AcquisitionDateTime", "gt", "2024-01-01T10:00:00")  # wall clock
    assert holds(ds, "AcquisitionDateTime", "lt", "20240102")
    assert holds(synthetic(AcquisitionDateTime="2024"), "AcquisitionDateTime", "ge", "2024-01-01")


def test_ordering_on_private_or_untyped_values_infers_the_kind_from_the_rule(
    ct: Dataset,
) -> None:
    assert holds(ct, "(0009,1027)", "gt", 862399668)  # private SL
    ds = synthetic()
    ds.add_new(0x00111010, "LO", "20240301")
    assert holds(ds, "(0011,1010)", "ge", "2024-03-01")
    assert holds(ds, "(0011,1010)", "lt", 20250000)


# -- tags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["Modality", "(0008,0060)", "0008,0060", "00080060", "(0008, 0060)"]
)
def test_tags_may_be_keywords_or_hex_in_any_accepted_spelling(ct: Dataset, tag: str) -> None:
    assert holds(ct, tag, "eq", "CT")


def test_hex_tags_reach_private_elements_and_file_meta(ct: Dataset) -> None:
    assert holds(ct, "(0009,1004)", "contains", "CT/i")  # GE private SH
    assert holds(ct, "(0043,1028)", "contains", "HiSpeed")  # private OB, read as text
    assert holds(ct, "(0002,0016)", "eq", "CLUNIE1")  # SourceApplicationEntityTitle


def test_ai_tags_are_read_from_extra_by_flat_or_nested_key(ct: Dataset) -> None:
    flat = {"ai.lungs.nodule": True, "ai.lungs.score": 0.91, "ai.lungs.labels": ["a", "b"]}
    assert holds(ct, "ai.lungs.nodule", "eq", True, extra=flat)
    assert holds(ct, "ai.lungs.score", "gt", 0.9, extra=flat)
    assert holds(ct, "ai.lungs.labels", "eq", "b", extra=flat)
    nested = {"ai": {"lungs": {"score": 0.5}}}
    assert holds(ct, "ai.lungs.score", "le", 0.5, extra=nested)
    assert not holds(ct, "ai.lungs.score", "exists", extra={})
    assert holds(ct, "ai.lungs.score", "exists", False, extra={})
    assert not holds(ct, "ai.lungs.score", "gt", 0.5, extra={"ai.lungs.score": "high"})


# -- header criteria ---------------------------------------------------------------------------


def test_ae_patterns_are_anchored_case_sensitive_wildcards(ct: Dataset) -> None:
    spec = rule(calling_aet=["CT_*", "MR?"], called_aet="DICOM*")
    assert spec.matches(routing_input(ct, calling="CT_1"))
    assert spec.matches(routing_input(ct, calling="CT_ "))  # trailing space is padding
    assert spec.matches(routing_input(ct, calling="MR1  "))
    assert not spec.matches(routing_input(ct, calling="MR12"))
    assert not spec.matches(routing_input(ct, calling="XCT_1"))
    assert not spec.matches(routing_input(ct, calling="ct_1"))
    assert not spec.matches(routing_input(ct, called="OTHER"))


def test_ae_patterns_treat_brackets_and_dots_literally(ct: Dataset) -> None:
    spec = rule(calling_aet="CT[1].A")
    assert spec.matches(routing_input(ct, calling="CT[1].A"))
    assert not spec.matches(routing_input(ct, calling="CT1xA"))


def test_source_ip_matches_cidrs_single_addresses_and_ipv6(ct: Dataset) -> None:
    spec = rule(source_ip=["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"])
    for ip in ["10.200.0.1", "192.168.1.7", "2001:db8::42", "::ffff:10.1.2.3"]:
        assert spec.matches(routing_input(ct, ip=ip)), ip
    for ip in ["192.168.1.8", "11.0.0.1", "2001:db9::1", "not-an-ip", ""]:
        assert not spec.matches(routing_input(ct, ip=ip)), ip


def test_modality_matches_case_insensitively_and_not_when_missing(ct: Dataset) -> None:
    assert rule(modality=["mr", "ct"]).matches(routing_input(ct))
    assert not rule(modality="MR").matches(routing_input(ct))
    assert not rule(modality="CT").matches(routing_input(synthetic()))


def test_sop_class_accepts_keywords_and_uids_and_falls_back_to_file_meta(ct: Dataset) -> None:
    spec = rule(sop_class=["CTImageStorage", MR_IMAGE_STORAGE])
    assert spec.sop_class == (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE)
    assert spec.matches(routing_input(ct))
    assert not rule(sop_class="MRImageStorage").matches(routing_input(ct))
    meta_only = synthetic()
    meta_only.file_meta = FileMetaDataset()
    meta_only.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    assert spec.matches(routing_input(meta_only))


# -- evaluation --------------------------------------------------------------------------------


def versioned(rule_id: str, **fields: object) -> VersionedRule:
    return VersionedRule(rule_id, 3, parse_rule({"name": rule_id, **fields}))


def test_rules_run_in_priority_then_name_order_and_all_matches_contribute(ct: Dataset) -> None:
    rules = [
        versioned("zeta", priority=20, destinations=["cloud", "pacs"]),
        versioned("beta", priority=10, destinations=["archive"]),
        versioned("alpha", priority=20, destinations=["pacs"]),
        versioned("miss", priority=5, modality="MR", destinations=["mr"]),
    ]
    decision = evaluate(rules, routing_input(ct))
    assert [m.rule_id for m in decision.matched] == ["beta", "alpha", "zeta"]
    assert decision.destinations == ("archive", "pacs", "cloud")
    assert decision.stopped_by is None
    assert decision.matched[0] == RuleMatch("beta", 3, "beta")


def test_a_matching_stop_rule_ends_evaluation_and_a_missing_one_does_not(ct: Dataset) -> None:
    rules = [
        versioned("first", priority=1, modality="MR", destinations=["mr"], stop=True),
        versioned("second", priority=2, destinations=["pacs"], stop=True),
        versioned("third", priority=3, destinations=["cloud"]),
    ]
    decision = evaluate(rules, routing_input(ct))
    assert decision == RoutingDecision((RuleMatch("second", 3, "second"),), ("pacs",), "second")


def test_a_stop_only_rule_routes_nowhere_and_blocks_later_rules(ct: Dataset) -> None:
    rules = [
        versioned("quarantine", priority=1, calling_aet="CT_*", stop=True),
        versioned("default", destinations=["pacs"]),
    ]
    decision = evaluate(rules, routing_input(ct))
    assert decision.destinations == ()
    assert decision.stopped_by == "quarantine"


def test_disabled_rules_are_skipped_even_with_stop(ct: Dataset) -> None:
    rules = [
        versioned("off", priority=1, enabled=False, destinations=["x"], stop=True),
        versioned("on", destinations=["pacs"]),
    ]
    decision = evaluate(rules, routing_input(ct))
    assert [m.rule_id for m in decision.matched] == ["on"]
    assert evaluate([], routing_input(ct)) == RoutingDecision((), (), None)


def test_the_example_rule_from_the_architecture_routes_a_ct_chest(ct: Dataset) -> None:
    toml = """
    [[rules]]
    name = "CT chest to PACS and cloud"
    priority = 10
    calling_aet = "CT_*"
    modality = ["CT"]
    match = [{ tag = "BodyPartExamined", op = "eq", value = "CHEST" },
             { tag = "StudyDate", op = "gt", value = 2004-01-01 }]
    destinations = ["pacs", "cloud"]
    stop = false
    """
    spec = parse_rule(tomllib.loads(toml)["rules"][0])
    chest = Dataset()
    chest.update(ct)
    chest.BodyPartExamined = "CHEST"
    decision = evaluate([VersionedRule("r1", 1, spec)], routing_input(chest))
    assert decision.destinations == ("pacs", "cloud")
    assert evaluate([VersionedRule("r1", 1, spec)], routing_input(ct)).matched == ()


# -- parse errors ------------------------------------------------------------------------------

OPS = "eq, ne, in, contains, startswith, regex, exists, lt, gt, le, ge"


def cond(**fields: object) -> dict[str, object]:
    return {"name": "CT chest", "destinations": ["pacs"], "match": [fields]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"destination": ["pacs"], "name": "CT chest"},
            "rule 'CT chest': destination: unknown key (did you mean 'destinations'?); "
            "destinations: at least one destination is required unless stop = true",
        ),
        ({"destinations": ["pacs"]}, "rule: name: required"),
        ({"name": " ", "destinations": ["pacs"]}, "rule: name: expected a non-empty string"),
        ({"name": 5, "destinations": ["pacs"]}, "rule: name: expected a string, got 5"),
        (
            {"name": "CT chest", "priority": "high", "destinations": ["a"]},
            "rule 'CT chest': priority: expected an integer, got 'high'",
        ),
        (
            {"name": "CT chest", "priority": True, "destinations": ["a"]},
            "rule 'CT chest': priority: expected an integer, got True",
        ),
        (
            {"name": "CT chest", "enabled": "yes", "destinations": ["a"]},
            "rule 'CT chest': enabled: expected true or false, got 'yes'",
        ),
        (
            {"name": "CT chest", "stop": 1, "destinations": ["a"]},
            "rule 'CT chest': stop: expected true or false, got 1",
        ),
        (
            {"name": "CT chest", "description": 3, "destinations": ["a"]},
            "rule 'CT chest': description: expected a string, got 3",
        ),
        (
            {"name": "CT chest", "calling_aet": 7, "destinations": ["a"]},
            "rule 'CT chest': calling_aet: expected a string or a list of strings, got 7",
        ),
        (
            {"name": "CT chest", "called_aet": ["A", ""], "destinations": ["a"]},
            "rule 'CT chest': called_aet[1]: expected a non-empty string, got ''",
        ),
        (
            {"name": "CT chest", "calling_aet": "CT\\1", "destinations": ["a"]},
            "rule 'CT chest': calling_aet[0]: 'CT\\\\1' is not a valid AE title pattern",
        ),
        (
            {"name": "CT chest", "source_ip": ["10.0.0.0/8", "10.0.0.1/8"], "destinations": ["a"]},
            "rule 'CT chest': source_ip[1]: '10.0.0.1/8' has host bits set "
            "(did you mean '10.0.0.0/8'?)",
        ),
        (
            {"name": "CT chest", "source_ip": "ten.0.0.1", "destinations": ["a"]},
            "rule 'CT chest': source_ip[0]: 'ten.0.0.1' is not an IP address or CIDR network",
        ),
        (
            {"name": "CT chest", "modality": ["CT", "C*"], "destinations": ["a"]},
            "rule 'CT chest': modality[1]: 'C*' is not a modality code such as 'CT'",
        ),
        (
            {"name": "CT chest", "sop_class": "CTStorage", "destinations": ["a"]},
            "rule 'CT chest': sop_class[0]: unknown SOP class 'CTStorage' "
            "(expected a UID or a keyword such as 'CTImageStorage')",
        ),
        (
            {"name": "CT chest", "sop_class": "ExplicitVRLittleEndian", "destinations": ["a"]},
            "rule 'CT chest': sop_class[0]: 'ExplicitVRLittleEndian' is a Transfer Syntax, "
            "not a SOP class",
        ),
        (
            {"name": "CT chest"},
            "rule 'CT chest': destinations: at least one destination is required "
            "unless stop = true",
        ),
        (
            {"name": "CT chest", "destinations": ["pacs", "pacs"]},
            "rule 'CT chest': destinations[1]: empty or duplicate destination 'pacs'",
        ),
        (
            {"name": "CT chest", "destinations": ["pacs"], "match": {"tag": "Modality"}},
            "rule 'CT chest': match: expected a list of tables, got {'tag': 'Modality'}",
        ),
        (
            {"name": "CT chest", "destinations": ["pacs"], "match": ["Modality"]},
            "rule 'CT chest': match[0]: expected a table with tag, op and value, got 'Modality'",
        ),
    ],
)
def test_invalid_rules_are_rejected_naming_the_rule_and_field(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(RuleError, match=f"^{re.escape(message)}$"):
        parse_rule(data)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            {"tag": "Modality", "op": "equals", "value": "CT"},
            f"op: unknown operator 'equals' (expected one of {OPS})",
        ),
        (
            {"tag": "Modality", "op": "eq", "value": "CT", "cs": False},
            "cs: unknown key (expected one of tag, op, value, case_sensitive)",
        ),
        (
            {"tag": "Modality", "op": "eq", "value": "CT", "case_sensitiv": False},
            "case_sensitiv: unknown key (did you mean 'case_sensitive'?)",
        ),
        ({"op": "eq", "value": "CT"}, "tag: required"),
        ({"tag": "Modality", "value": "CT"}, "op: required"),
        ({"tag": "Modality", "op": "eq"}, "value: required for op 'eq'"),
        (
            {"tag": "Modalty", "op": "eq", "value": "CT"},
            "tag: unknown tag 'Modalty' (expected a DICOM keyword such as 'Modality', "
            "'(gggg,eeee)' or 'ai.<destination>.<key>')",
        ),
        ({"tag": "(0008,006G)", "op": "eq", "value": "CT"}, "tag: unknown tag '(0008,006G)'"),
        (
            {"tag": "ai.lungs", "op": "eq", "value": 1},
            "tag: 'ai.lungs' is not of the form ai.<destination>.<key>",
        ),
        (
            {"tag": "Modality", "op": "in", "value": "CT"},
            "value: expected a non-empty list for 'in', got 'CT'",
        ),
        (
            {"tag": "Modality", "op": "in", "value": []},
            "value: expected a non-empty list for 'in', got []",
        ),
        (
            {"tag": "Modality", "op": "in", "value": ["CT", {"a": 1}]},
            "value[1]: expected a string, number or boolean, got {'a': 1}",
        ),
        (
            {"tag": "Modality", "op": "eq", "value": ["CT", "MR"]},
            "value: expected a single value for 'eq' (use 'in' for a list)",
        ),
        (
            {"tag": "Modality", "op": "contains", "value": 5},
            "value: expected a non-empty string for 'contains', got 5",
        ),
        (
            {"tag": "Modality", "op": "exists", "value": "yes"},
            "value: expected true or false for 'exists', got 'yes'",
        ),
        (
            {"tag": "Modality", "op": "regex", "value": "C(T"},
            "value: invalid regular expression 'C(T': missing ), unterminated subpattern "
            "at position 1",
        ),
        (
            {"tag": "Rows", "op": "gt", "value": "many"},
            "value: 'many' is not a number (Rows is US)",
        ),
        (
            {"tag": "StudyDate", "op": "lt", "value": "2024-13-01"},
            "value: '2024-13-01' is not a date (YYYYMMDD or YYYY-MM-DD) (StudyDate is DA)",
        ),
        (
            {"tag": "StudyTime", "op": "lt", "value": "noon"},
            "value: 'noon' is not a time (HHMMSS or HH:MM:SS) (StudyTime is TM)",
        ),
        (
            {"tag": "AccessionNumber", "op": "gt", "value": "A100"},
            "value: 'A100' is neither a number nor a date, cannot order AccessionNumber",
        ),
        (
            {"tag": "Rows", "op": "gt", "value": True},
            "value: expected a number or a date for 'gt', got True",
        ),
        (
            {"tag": "Rows", "op": "gt", "value": 5, "case_sensitive": False},
            "case_sensitive: does not apply to 'gt'",
        ),
        (
            {"tag": "Modality", "op": "eq", "value": "CT", "case_sensitive": "no"},
            "case_sensitive: expected true or false, got 'no'",
        ),
        (
            {"tag": "OtherPatientIDsSequence", "op": "eq", "value": "x"},
            "op: OtherPatientIDsSequence is a sequence; only 'exists' is supported",
        ),
    ],
)
def test_invalid_conditions_are_rejected_naming_the_rule_and_condition(
    condition: dict[str, object], message: str
) -> None:
    data = {
        "name": "CT chest",
        "destinations": ["pacs"],
        "match": [{"tag": "Modality", "op": "exists"}, condition],
    }
    with pytest.raises(RuleError) as raised:
        parse_rule(data)
    assert str(raised.value).startswith(f"rule 'CT chest': match[1].{message}")


@pytest.mark.parametrize(
    ("condition", "errors"),
    [
        # The tag, the operator and unknown keys are independent: each is said.
        (
            {"tag": "Modalty", "op": "equals", "value": "CT", "cs": False},
            {"tag": "unknown tag 'Modalty' (expected a DICOM keyword such as 'Modality', "
                    "'(gggg,eeee)' or 'ai.<destination>.<key>')",
             "op": f"unknown operator 'equals' (expected one of {OPS})",
             "cs": "unknown key (expected one of tag, op, value, case_sensitive)"},
        ),
        ({"value": 3}, {"tag": "required", "op": "required"}),
        # The value is checked against a valid operator even when the tag is unknown (without
        # its VR: only whether it orders at all)...
        (
            {"tag": "Rws", "op": "gt", "value": "many", "case_sensitive": False},
            {"tag": "unknown tag 'Rws' (expected a DICOM keyword such as 'Modality', "
                    "'(gggg,eeee)' or 'ai.<destination>.<key>')",
             "value": "'many' is neither a number nor a date, cannot order Rws",
             "case_sensitive": "does not apply to 'gt'"},
        ),
        (
            {"tag": "Modalty", "op": "in", "value": ["CT", {"a": 1}]},
            {"tag": "unknown tag 'Modalty' (expected a DICOM keyword such as 'Modality', "
                    "'(gggg,eeee)' or 'ai.<destination>.<key>')",
             "value[1]": "expected a string, number or boolean, got {'a': 1}"},
        ),
        # ... and against the tag's VR when the tag is known.
        (
            {"tag": "Rows", "op": "gt", "value": "many", "case_sensitive": "no",
             "case_sensitiv": True},
            {"value": "'many' is not a number (Rows is US)",
             "case_sensitive": "expected true or false, got 'no'",
             "case_sensitiv": "unknown key (did you mean 'case_sensitive'?)"},
        ),
        # An unknown operator: nothing can be said of the value.
        ({"tag": "Rows", "op": "like", "value": {"x": 1}},
         {"op": f"unknown operator 'like' (expected one of {OPS})"}),
    ],
)
def test_every_independent_problem_of_a_condition_is_listed(
    condition: dict[str, object], errors: dict[str, str]
) -> None:
    with pytest.raises(ConditionError) as raised:
        parse_condition(condition)
    assert raised.value.errors == errors
    assert str(raised.value) == "; ".join(f"{key}: {message}" for key, message in errors.items())
    with pytest.raises(RuleError) as in_rule:
        parse_rule(cond(**condition))
    assert in_rule.value.errors == {f"match[0].{key}": message for key, message in errors.items()}


def test_rules_built_directly_are_validated_and_normalised_too() -> None:
    spec = RuleSpec(name="direct", sop_class=("CTImageStorage",), destinations=("pacs",))
    assert spec.sop_class == (CT_IMAGE_STORAGE,)
    with pytest.raises(RuleError, match=r"^rule 'direct': destinations: at least one"):
        RuleSpec(name="direct")
    with pytest.raises(RuleError, match=r"^rule 'direct': source_ip\[0\]: 'x' is not an IP"):
        RuleSpec(name="direct", source_ip=("x",), destinations=("pacs",))


def test_conditions_built_directly_are_validated_too() -> None:
    with pytest.raises(ConditionError, match=r"^op: unknown operator 'equals'"):
        Condition("Modality", "equals", "CT")
    assert issubclass(ConditionError, RuleError)
    assert issubclass(RuleError, ValueError)


# -- serialisation -----------------------------------------------------------------------------


def test_to_dict_is_json_safe_and_round_trips_through_parse_rule() -> None:
    toml = """
    name = "everything"
    priority = 7
    enabled = false
    calling_aet = ["CT_*", "MR?"]
    called_aet = "DICOMROUTER"
    source_ip = ["10.0.0.0/8", "2001:db8::/32"]
    modality = "ct"
    sop_class = ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.4"]
    match = [
      { tag = "BodyPartExamined", op = "eq", value = "CHEST", case_sensitive = false },
      { tag = "(0008,0060)", op = "in", value = ["CT", "MR"] },
      { tag = "StudyDate", op = "ge", value = 2024-01-01 },
      { tag = "StudyTime", op = "lt", value = 12:30:00 },
      { tag = "Rows", op = "le", value = 512 },
      { tag = "ai.lungs.nodule", op = "exists" },
      { tag = "SeriesDescription", op = "regex", value = "^AX" },
    ]
    destinations = ["pacs", "cloud"]
    stop = true
    description = "all fields"
    """
    spec = parse_rule(tomllib.loads(toml))
    as_json = json.loads(json.dumps(spec.to_dict()))
    assert parse_rule(as_json) == spec
    assert as_json["sop_class"] == [CT_IMAGE_STORAGE, MR_IMAGE_STORAGE]
    assert as_json["match"][2] == {"tag": "StudyDate", "op": "ge", "value": "2024-01-01"}
    assert as_json["match"][5] == {"tag": "ai.lungs.nodule", "op": "exists", "value": True}


def test_rules_survive_pickling_with_their_compiled_conditions(ct: Dataset) -> None:
    spec = rule(calling_aet="CT_*", match=[{"tag": "ImageType", "op": "regex", "value": "^AX"}])
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec
    assert copy.matches(routing_input(ct))


def test_routing_input_repr_leaves_out_the_dataset(ct: Dataset) -> None:
    assert "CompressedSamples" not in repr(routing_input(ct, extra={"ai.x.name": "Doe"}))


def test_defaults_of_a_minimal_rule() -> None:
    spec = parse_rule({"name": "  all to pacs ", "destinations": "pacs"})
    assert spec == RuleSpec(name="all to pacs", destinations=("pacs",))
    assert (spec.priority, spec.enabled, spec.stop, spec.match) == (100, True, False, ())
    assert parse_rule(spec.to_dict()) == spec


# -- explain -----------------------------------------------------------------------------------


def test_explain_reports_one_row_per_criterion_with_the_actual_value(ct: Dataset) -> None:
    spec = rule(
        calling_aet="CT_*",
        source_ip="192.168.0.0/16",
        sop_class="CTImageStorage",
        match=[
            {"tag": "ImageType", "op": "eq", "value": "AXIAL"},
            {"tag": "BodyPartExamined", "op": "eq", "value": "CHEST", "case_sensitive": False},
            {"tag": "ai.lungs.score", "op": "gt", "value": 0.5},
        ],
    )
    rows = explain(spec, routing_input(ct, calling="CT_1 ", extra={"ai.lungs.score": 0.7}))
    assert rows == (
        ConditionResult("calling_aet: CT_*", True, "CT_1"),
        ConditionResult("called_aet: any", True, "DICOMROUTER"),
        ConditionResult("source_ip: 192.168.0.0/16", False, "10.1.2.3"),
        ConditionResult("modality: any", True, "CT"),
        ConditionResult(f"sop_class: {CT_IMAGE_STORAGE}", True, CT_IMAGE_STORAGE),
        ConditionResult('match[0]: ImageType eq "AXIAL"', True, "ORIGINAL\\PRIMARY\\AXIAL"),
        ConditionResult('match[1]: BodyPartExamined eq "CHEST" (case-insensitive)', False, None),
        ConditionResult("match[2]: ai.lungs.score gt 0.5", True, "0.7"),
    )
    assert not spec.matches(routing_input(ct))


def test_explain_labels_exists_conditions_plainly(ct: Dataset) -> None:
    spec = rule(
        match=[{"tag": "Modality", "op": "exists"}, {"tag": "Rows", "op": "exists", "value": False}]
    )
    labels = [row.label for row in explain(spec, routing_input(ct))[5:]]
    assert labels == ["match[0]: Modality exists", "match[1]: Rows does not exist"]
