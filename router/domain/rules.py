"""Routing rules: the declared model (:class:`RuleSpec`), its parser and the evaluator.

Patterns, networks, SOP classes and tags are compiled once when a rule is built, so
:func:`evaluate` stays cheap enough for the C-STORE path. Tag conditions: ``rule_conditions``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Annotated, Any, TypeVar

import pydicom
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from router.config_types import (
    SECTION,
    After,
    Before,
    Doc,
    DurationSchema,
    FieldProblem,
    JsonSchema,
    Plain,
    problems_of,
    validated,
    validation_error,
)
from router.domain.grouping import (
    AMENDMENTS,
    GRANULARITIES,
    GROUPING_KEYS,
    MAX_EXPECTED_COUNT,
    GroupingError,
    check_grouping,
    duration_seconds,
)
from router.domain.rule_conditions import (
    OPERATORS,
    Atoms,
    Condition,
    ConditionError,
    RuleError,
    actual_text,
    dataset_values,
    parse_condition,
    text_of,
)

__all__ = [
    "Condition",
    "ConditionError",
    "ConditionResult",
    "RoutingDecision",
    "RoutingInput",
    "RuleError",
    "RuleMatch",
    "RuleSpec",
    "VersionedRule",
    "evaluate",
    "explain",
    "parse_condition",
    "parse_rule",
    "stored_rule",
]

T = TypeVar("T")
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_MODALITY_TAG = BaseTag(0x00080060)
_SOP_CLASS_TAGS = (BaseTag(0x00080016), BaseTag(0x00020002))  # dataset, then file meta
_UID = re.compile(r"^(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*$")
_MODALITY = re.compile(r"^[A-Za-z0-9_ ]{1,16}$")
_AE_PATTERN_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


# -- compiled criteria -----------------------------------------------------------------------


def _ae_pattern(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One anchored, case-sensitive regex for fnmatch-style ``*``/``?`` patterns."""
    if not patterns:
        return None
    parts = (
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p)
        for p in patterns
    )
    return re.compile("(?:" + "|".join(parts) + ")", re.DOTALL)


def _network(text: str) -> Network:
    try:
        return ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
    raise ValueError(f"{text!r} has host bits set (did you mean '{loose}'?)")


@cache
def _sop_class_keywords() -> dict[str, tuple[str, str]]:
    """Keyword -> (UID, UID type) from pydicom's UID dictionary."""
    return {entry[4]: (uid, entry[1]) for uid, entry in UID_dictionary.items() if entry[4]}


def _sop_class_uid(text: str) -> str:
    if _UID.match(text) and len(text) <= 64:
        return text
    found = _sop_class_keywords().get(text)
    if found is None:
        raise ValueError(
            f"unknown SOP class {text!r} (expected a UID or a keyword such as 'CTImageStorage')"
        )
    uid, kind = found
    if kind != "SOP Class":
        raise ValueError(f"{text!r} is a {kind}, not a SOP class")
    return uid


@dataclass(frozen=True)
class _Facts:
    """What every rule looks at, read once per instance (the header's values only when a rule
    asks: converting them is most of the routing time when rules test AE titles only)."""

    calling_aet: str
    called_aet: str
    address: Address | None
    item: RoutingInput = field(repr=False)
    seen: dict[BaseTag | str, Atoms | None] = field(default_factory=dict, repr=False)

    def holds(self, condition: Condition) -> bool:
        """``condition`` on this instance, reading each element once however many rules ask."""
        source = condition.source
        if source not in self.seen:
            self.seen[source] = condition.values(self.item.dataset, self.item.extra)
        return condition.holds_for(self.seen[source])

    @cached_property
    def modalities(self) -> tuple[str, ...]:
        found = dataset_values(self.item.dataset, _MODALITY_TAG) or ()
        return tuple((text_of(m) or "").upper() for m in found)

    @cached_property
    def sop_class(self) -> str | None:
        found = next(
            (v[0] for t in _SOP_CLASS_TAGS if (v := dataset_values(self.item.dataset, t))), None
        )
        return None if found is None else text_of(found)

    @classmethod
    def of(cls, item: RoutingInput) -> _Facts:
        try:
            address: Address | None = ip_address(item.source_ip.strip())
        except ValueError:
            address = None
        return cls(calling_aet=item.calling_aet.strip(), called_aet=item.called_aet.strip(),
                   address=address, item=item)


# -- one field at a time (pydantic runs these when a rule comes in: parse_rule) ---------------


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


def _name(value: object) -> str:
    text = _text(value)
    if not text:
        raise ValueError("expected a non-empty string")
    return text


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _listed_strings(value: object) -> object:
    """A string is a list of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a string or a list of strings, got {value!r}")
    return value


def _item(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _ae_pattern_item(pattern: str) -> str:
    if not pattern or _AE_PATTERN_FORBIDDEN.search(pattern):
        raise ValueError(f"{pattern!r} is not a valid AE title pattern")
    return pattern


def _network_item(text: str) -> str:
    _network(text)
    return text


def _modality_item(modality: str) -> str:
    if not _MODALITY.match(modality):
        raise ValueError(f"{modality!r} is not a modality code such as 'CT'")
    return modality


def _distinct_destinations(names: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    problems: dict[int, str] = {}
    for i, name in enumerate(names):
        if name in seen:
            problems[i] = f"empty or duplicate destination {name!r}"
        seen.add(name)
    if problems:
        raise FieldProblem(problems)
    return names


def _distinct_transforms(names: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(names)) != len(names):
        raise ValueError("a transform is named more than once")
    return names


def _tables(value: object) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of tables, got {value!r}")
    return value


def _condition(value: object) -> Condition:
    """A condition checked by its own class; each of its problems named by its key (``op``,
    ``value[1]``)."""
    if isinstance(value, Condition):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table with tag, op and value, got {value!r}")
    try:
        return parse_condition(value)
    except ConditionError as exc:
        raise FieldProblem(exc.errors) from None


def _grouping(key: str) -> Callable[[object], object]:
    """The grouping module's check of one key, None meaning "not set"."""
    def check(value: object) -> object:
        if value is None and key != "amendments":  # amendments has no "not set"
            return None
        keys: dict[str, object] = {"granularity": None, "quiet_time": None,
                                   "expected_count": None, "amendments": "late_only"}
        try:
            check_grouping(**{**keys, key: value})
        except GroupingError as exc:
            raise ValueError(str(exc).partition(": ")[2]) from None
        return duration_seconds(value, key) if key == "quiet_time" else value
    return check


_CONDITION_SCHEMA = JsonSchema({
    "type": "object", "additionalProperties": False, "required": ["tag", "op"],
    "description": "tag op value",
    "properties": {
        "tag": {"type": "string", "description": "a DICOM keyword (Modality), a tag "
                "'(gggg,eeee)' or ai.<destination>.<key>"},
        "op": {"enum": list(OPERATORS)},
        "value": {"description": "a list for 'in'; true/false for 'exists' (its default)",
                  "anyOf": [{"type": ["string", "number", "boolean"]},
                            {"type": "array", "items": {"type": ["string", "number",
                                                                 "boolean"]}}]},
        "case_sensitive": {"type": "boolean", "default": True,
                           "description": "false: eq, ne, in, contains, startswith and "
                           "regex ignore case"}}})
_STRINGS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def _strings_doc(text: str) -> JsonSchema:
    return JsonSchema({**_STRINGS_SCHEMA, "description": text})


Name = Annotated[str, Before(_name), Doc(
    "unique; a rule keeps its name (in an API body, the URL's name when replacing)")]
# Each list takes one string too; its items are stripped, non-empty, then checked one by one.
Item = Annotated[str, Before(_item)]
AEPatterns = Annotated[tuple[Annotated[Item, After(_ae_pattern_item)], ...],
                       Before(_listed_strings), _strings_doc(
                           "AE title patterns (* and ?); empty: any")]
SourceNetworks = Annotated[tuple[Annotated[Item, After(_network_item)], ...],
                           Before(_listed_strings), _strings_doc(
                               "addresses or CIDR networks the instance came from; empty: any")]
Modalities = Annotated[tuple[Annotated[Item, After(_modality_item)], ...],
                       Before(_listed_strings), _strings_doc(
                           "modality codes such as CT; empty: any")]
SopClasses = Annotated[tuple[Annotated[Item, After(_sop_class_uid)], ...],
                       Before(_listed_strings), _strings_doc(
                           "SOP class UIDs or keywords (CTImageStorage); empty: any")]
Conditions = Annotated[tuple[Annotated[Condition, Plain(_condition), _CONDITION_SCHEMA], ...],
                       Before(_tables), Doc("tag conditions, all of which must hold")]
Destinations = Annotated[tuple[Item, ...], Before(_listed_strings), After(_distinct_destinations),
                         _strings_doc(
    "destinations that receive what the rule matches; at least one unless stop = true")]
RuleTransforms = Annotated[tuple[Item, ...], Before(_listed_strings), After(_distinct_transforms),
                           _strings_doc(
    "transform names, applied before the destination's own to what this rule sends")]


# -- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """One routing rule as declared; validated and compiled on construction.

    Empty criteria match anything. ``sop_class`` holds UIDs (keywords are resolved).

    The annotations are the one description of a ``[[rules]]`` table and of the API's rule
    body (keys, types, messages, OpenAPI descriptions): :func:`parse_rule` validates data with
    them through pydantic, each field on its own, so every problem of a rule is said at once;
    ``__post_init__`` checks what needs several fields and compiles the criteria, also when a
    rule is built directly.
    """

    __pydantic_config__ = SECTION

    name: Name
    priority: Annotated[int, Before(_integer), Doc("lower runs first")] = 100
    enabled: Annotated[bool, Before(_boolean)] = True
    calling_aet: AEPatterns = ()
    called_aet: AEPatterns = ()
    source_ip: SourceNetworks = ()
    modality: Modalities = ()
    sop_class: SopClasses = ()
    match: Conditions = ()
    destinations: Destinations = ()
    stop: Annotated[bool, Before(_boolean), Doc(
        "no later rule is evaluated when this one matches")] = False
    description: Annotated[str, Before(_text)] = ""
    # Series/study-level routing (router.domain.grouping); None: the destination's default.
    granularity: Annotated[str | None, Before(_grouping("granularity")), JsonSchema({
        "enum": [*GRANULARITIES, None], "description": "send per series or study once "
        "stable; unset: the destination's default"})] = None
    quiet_time: Annotated[float | None, Before(_grouping("quiet_time")), DurationSchema, Doc(
        "how long a series or study stays unchanged before it is sent (up to 7 days); "
        "unset: 60 s per series, 180 s per study")] = None
    expected_count: Annotated[int | None, Before(_grouping("expected_count")), Doc(
        f"send as soon as this many instances arrived (1 to {MAX_EXPECTED_COUNT})")] = None
    amendments: Annotated[str, Before(_grouping("amendments")), JsonSchema({
        "enum": list(AMENDMENTS), "default": "late_only", "description": "whole_unit: late "
        "instances resend the whole series or study"})] = "late_only"
    transforms: RuleTransforms = ()
    _calling: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _called: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _networks: tuple[Network, ...] = field(default=(), init=False, repr=False, compare=False)
    _modalities: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RuleError("rule: name: expected a non-empty string",
                            {"name": "expected a non-empty string"})
        # Every problem is collected, then raised together: a file with several mistakes is
        # corrected in one run of check-config.
        # The field validators' own checks (parse_rule ran them already; a rule built
        # directly has not been through them).
        problems: dict[str, str] = {}
        for key in ("calling_aet", "called_aet"):
            self._compile_each(key, _ae_pattern_item, problems)
        if not problems:
            object.__setattr__(self, "_calling", _ae_pattern(self.calling_aet))
            object.__setattr__(self, "_called", _ae_pattern(self.called_aet))
        object.__setattr__(self, "_networks",
                           self._compile_each("source_ip", _network, problems))
        object.__setattr__(self, "sop_class",
                           self._compile_each("sop_class", _sop_class_uid, problems))
        self._compile_each("modality", _modality_item, problems)
        object.__setattr__(self, "_modalities", frozenset(m.upper() for m in self.modality))
        self._check_destinations(problems)
        if len(set(self.transforms)) != len(self.transforms):
            problems["transforms"] = "a transform is named more than once"
        try:
            check_grouping(self.granularity, self.quiet_time, self.expected_count,
                           self.amendments)
        except GroupingError as exc:
            key, _, problem = str(exc).partition(": ")
            problems.setdefault(key, problem)
        if problems:
            raise RuleError(f"rule {self.name!r}: " + "; ".join(
                f"{key}: {problem}" for key, problem in problems.items()), problems)
        if self.quiet_time is not None:
            object.__setattr__(self, "quiet_time", duration_seconds(self.quiet_time, ""))

    def _compile_each(self, key: str, compile_one: Callable[[str], T],
                      problems: dict[str, str]) -> tuple[T, ...]:
        compiled: list[T] = []
        for i, text in enumerate(getattr(self, key)):
            try:
                compiled.append(compile_one(text))
            except ValueError as exc:
                problems[f"{key}[{i}]"] = str(exc)
        return tuple(compiled)

    def _check_destinations(self, problems: dict[str, str]) -> None:
        if not self.destinations and not self.stop:
            problems["destinations"] = "at least one destination is required unless stop = true"
        seen: set[str] = set()
        for i, name in enumerate(self.destinations):
            if not name or name in seen:
                problems[f"destinations[{i}]"] = f"empty or duplicate destination {name!r}"
            seen.add(name)

    def _aet_ok(self, pattern: re.Pattern[str] | None, aet: str) -> bool:
        return pattern is None or pattern.fullmatch(aet) is not None

    def _address_ok(self, address: Address | None) -> bool:
        if not self._networks:
            return True
        if address is None:
            return False
        mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
        return any(address in n or (mapped is not None and mapped in n) for n in self._networks)

    def _modality_ok(self, modalities: tuple[str, ...]) -> bool:
        return not self._modalities or any(m in self._modalities for m in modalities)

    def _sop_class_ok(self, sop_class: str | None) -> bool:
        return not self.sop_class or sop_class in self.sop_class

    def _matches(self, facts: _Facts) -> bool:
        return (
            self._aet_ok(self._calling, facts.calling_aet)
            and self._aet_ok(self._called, facts.called_aet)
            and self._address_ok(facts.address)
            and (not self._modalities or self._modality_ok(facts.modalities))
            and (not self.sop_class or self._sop_class_ok(facts.sop_class))
            and all(facts.holds(c) for c in self.match)
        )

    def matches(self, item: RoutingInput) -> bool:
        """True when every criterion holds for ``item`` (``enabled`` is not considered)."""
        return self._matches(_Facts.of(item))

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form; ``parse_rule(spec.to_dict()) == spec``."""
        return {
            "name": self.name,
            "priority": self.priority,
            "enabled": self.enabled,
            "calling_aet": list(self.calling_aet),
            "called_aet": list(self.called_aet),
            "source_ip": list(self.source_ip),
            "modality": list(self.modality),
            "sop_class": list(self.sop_class),
            "match": [c.to_dict() for c in self.match],
            "destinations": list(self.destinations),
            "stop": self.stop,
            "description": self.description,
            **self.grouping(),
            # Left out when empty: specs stored before transforms compare equal.
            **({"transforms": list(self.transforms)} if self.transforms else {}),
        }

    def grouping(self) -> dict[str, object]:
        """The grouping keys that are set (left out when unset: older specs compare equal)."""
        keys = {key: getattr(self, key) for key in GROUPING_KEYS}
        if keys["amendments"] == "late_only":
            del keys["amendments"]
        return {key: value for key, value in keys.items() if value is not None}


@dataclass(frozen=True)
class VersionedRule:
    """A rule as stored: its aggregate id and version, recorded in routing decisions."""

    rule_id: str
    version: int
    spec: RuleSpec


@dataclass(frozen=True)
class RoutingInput:
    """One received instance as the rules see it: who sent it and its header (no pixel data)."""

    calling_aet: str
    called_aet: str
    source_ip: str
    dataset: pydicom.Dataset = field(repr=False)  # PHI: keep it out of logged reprs
    extra: Mapping[str, object] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RuleMatch:
    """A rule that matched, by id and version, so a decision can be explained later."""

    rule_id: str
    version: int
    name: str


@dataclass(frozen=True)
class RoutingDecision:
    """Matching rules in evaluation order and the destinations they chose."""

    matched: tuple[RuleMatch, ...]
    destinations: tuple[str, ...]
    stopped_by: str | None


@dataclass(frozen=True)
class ConditionResult:
    """One criterion of a rule tested against one instance (``actual`` may be PHI)."""

    label: str
    matched: bool
    actual: str | None


# -- parsing ---------------------------------------------------------------------------------


def parse_rule(data: Mapping[str, object]) -> RuleSpec:
    """A validated :class:`RuleSpec` from a ``[[rules]]`` table or an API body; raises
    :class:`RuleError` naming every problem found (``errors``: path in the rule -> problem,
    e.g. ``match[1].op``), each field checked whatever the others hold."""
    name = data.get("name") if isinstance(data, Mapping) else None
    where = f"rule {name.strip()!r}" if isinstance(name, str) and name.strip() else "rule"
    if not isinstance(data, Mapping):
        problem = f"expected a table, got {type(data).__name__}"
        raise RuleError(f"{where}: {problem}", {"": problem})
    try:
        return validated(RuleSpec, {str(key): value for key, value in data.items()})
    except validation_error() as exc:
        problems = {p.path: p.message for p in problems_of(exc, RuleSpec)}
    # What needs several fields is said too when other fields are wrong (pydantic builds the
    # rule, and so runs __post_init__, only when every field is valid).
    if (not any(path.startswith(("destinations", "stop")) for path in problems)
            and not data.get("destinations") and data.get("stop") is not True):
        problems["destinations"] = "at least one destination is required unless stop = true"
    raise RuleError(f"{where}: " + "; ".join(
        f"{key}: {problem}" if key else problem for key, problem in problems.items()),
        problems)


def stored_rule(data: Mapping[str, Any]) -> RuleSpec:
    """A rule as its events recorded it (``RuleSpec.to_dict``), validated when it was saved:
    built and compiled as is, without pydantic (every process follows the admin log)."""
    values: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value
              for key, value in data.items() if key != "match"}
    return RuleSpec(**values, match=tuple(parse_condition(c) for c in data.get("match", ())))


# -- evaluating ------------------------------------------------------------------------------


def evaluate(rules: Sequence[VersionedRule], item: RoutingInput) -> RoutingDecision:
    """Enabled rules in (priority, name) order; all matching rules contribute destinations
    until a matching rule with stop=True."""
    facts = _Facts.of(item)
    enabled = sorted(
        (r for r in rules if r.spec.enabled),
        key=lambda r: (r.spec.priority, r.spec.name, r.rule_id),
    )
    matched: list[RuleMatch] = []
    destinations: dict[str, None] = {}  # an ordered set
    for rule in enabled:
        if not rule.spec._matches(facts):
            continue
        matched.append(RuleMatch(rule.rule_id, rule.version, rule.spec.name))
        destinations.update(dict.fromkeys(rule.spec.destinations))
        if rule.spec.stop:
            return RoutingDecision(tuple(matched), tuple(destinations), rule.rule_id)
    return RoutingDecision(tuple(matched), tuple(destinations), None)


def _listed(key: str, values: tuple[str, ...]) -> str:
    return f"{key}: {', '.join(values) if values else 'any'}"


def explain(rule: RuleSpec, item: RoutingInput) -> tuple[ConditionResult, ...]:
    """One row per criterion: the five header criteria (``any`` when unset), then each condition.

    ``enabled`` is not considered. ``actual`` is the instance's value and may be PHI.
    """
    facts = _Facts.of(item)
    checks = (
        ("calling_aet", rule._aet_ok(rule._calling, facts.calling_aet), facts.calling_aet),
        ("called_aet", rule._aet_ok(rule._called, facts.called_aet), facts.called_aet),
        ("source_ip", rule._address_ok(facts.address), item.source_ip),
        ("modality", rule._modality_ok(facts.modalities), "\\".join(facts.modalities) or None),
        ("sop_class", rule._sop_class_ok(facts.sop_class), facts.sop_class),
    )
    rows = [ConditionResult(_listed(k, getattr(rule, k)), ok, actual) for k, ok, actual in checks]
    for i, condition in enumerate(rule.match):
        atoms = condition.values(item.dataset, item.extra)
        label = f"match[{i}]: {condition.label()}"
        rows.append(ConditionResult(label, condition.holds_for(atoms), actual_text(atoms)))
    return tuple(rows)
