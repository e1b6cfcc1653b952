"""Routing rules: the declared model (:class:`RuleSpec`), its parser and the evaluator.

Patterns, networks, SOP classes and tags are compiled once when a rule is built, so
:func:`evaluate` stays cheap enough for the C-STORE path. Tag conditions: ``rule_conditions``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache, cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, TypeVar

import pydicom
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from router.domain.grouping import GROUPING_KEYS, GroupingError, check_grouping, duration_seconds
from router.domain.rule_conditions import (
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
]

T = TypeVar("T")
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_MODALITY_TAG = BaseTag(0x00080060)
_SOP_CLASS_TAGS = (BaseTag(0x00080016), BaseTag(0x00020002))  # dataset, then file meta
_UID = re.compile(r"^(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*$")
_MODALITY = re.compile(r"^[A-Za-z0-9_ ]{1,16}$")
_AE_PATTERN_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


class _FieldError(RuleError):
    """One field of a rule is invalid; ``str()`` is ``"<field>: <problem>"``."""


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


# -- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """One routing rule as declared; validated and compiled on construction.

    Empty criteria match anything. ``sop_class`` holds UIDs (keywords are resolved).
    """

    name: str
    priority: int = 100
    enabled: bool = True
    calling_aet: tuple[str, ...] = ()
    called_aet: tuple[str, ...] = ()
    source_ip: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    match: tuple[Condition, ...] = ()
    destinations: tuple[str, ...] = ()
    stop: bool = False
    description: str = ""
    # Series/study-level routing (router.domain.grouping); None: the destination's default.
    granularity: str | None = None
    quiet_time: float | None = None
    expected_count: int | None = None
    amendments: str = "late_only"
    # Transform names applied, before the destination's own, to what this rule sends.
    transforms: tuple[str, ...] = ()
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
        problems: dict[str, str] = {}
        for key in ("calling_aet", "called_aet"):
            for i, pattern in enumerate(getattr(self, key)):
                if not pattern or _AE_PATTERN_FORBIDDEN.search(pattern):
                    problems[f"{key}[{i}]"] = f"{pattern!r} is not a valid AE title pattern"
        if not problems:
            object.__setattr__(self, "_calling", _ae_pattern(self.calling_aet))
            object.__setattr__(self, "_called", _ae_pattern(self.called_aet))
        object.__setattr__(self, "_networks",
                           self._compile_each("source_ip", _network, problems))
        object.__setattr__(self, "sop_class",
                           self._compile_each("sop_class", _sop_class_uid, problems))
        for i, modality in enumerate(self.modality):
            if not _MODALITY.match(modality):
                problems[f"modality[{i}]"] = f"{modality!r} is not a modality code such as 'CT'"
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

_RULE_KEYS = tuple(f.name for f in fields(RuleSpec) if f.init)


def _check_keys(data: Mapping[str, object]) -> dict[str, str]:
    """Each unknown key with a did-you-mean."""
    problems: dict[str, str] = {}
    for key in data:
        if key not in _RULE_KEYS:
            close = difflib.get_close_matches(str(key), _RULE_KEYS, n=1)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else f"expected one of {', '.join(_RULE_KEYS)}"
            )
            problems[str(key)] = f"unknown key ({hint})"
    return problems


def _string(data: Mapping[str, object], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _FieldError(f"{key}: expected a string, got {value!r}")
    return value.strip()


def _strings(data: Mapping[str, object], key: str) -> tuple[str, ...]:
    """A string or a list of strings, stripped."""
    value = data.get(key, ())
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise _FieldError(f"{key}: expected a string or a list of strings, got {value!r}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise _FieldError(f"{key}[{i}]: expected a non-empty string, got {item!r}")
    return tuple(item.strip() for item in items)


def _integer(data: Mapping[str, object], key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(f"{key}: expected an integer, got {value!r}")
    return value


def _boolean(data: Mapping[str, object], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _FieldError(f"{key}: expected true or false, got {value!r}")
    return value


def _conditions(data: Mapping[str, object], problems: dict[str, str]) -> tuple[Condition, ...]:
    """The ``match`` conditions that parse; a problem for each one that does not."""
    value = data.get("match", ())
    if not isinstance(value, list | tuple):
        problems["match"] = f"expected a list of tables, got {value!r}"
        return ()
    conditions: list[Condition] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            problems[f"match[{i}]"] = f"expected a table with tag, op and value, got {item!r}"
            continue
        try:
            conditions.append(parse_condition(item))
        except ConditionError as exc:
            key, _, problem = str(exc).partition(": ")
            problems[f"match[{i}].{key}"] = problem
    return tuple(conditions)


def parse_rule(data: Mapping[str, object]) -> RuleSpec:
    """A validated :class:`RuleSpec` from a ``[[rules]]`` table; raises :class:`RuleError`
    naming every problem found (each field is checked, whatever the others hold)."""
    name = data.get("name") if isinstance(data, Mapping) else None
    where = f"rule {name.strip()!r}" if isinstance(name, str) and name.strip() else "rule"
    if not isinstance(data, Mapping):
        problem = f"expected a table, got {type(data).__name__}"
        raise RuleError(f"{where}: {problem}", {"": problem})
    problems = _check_keys(data)
    if "name" not in data:
        problems["name"] = "required"

    def checked(parse: Callable[..., Any], *args: Any, default: Any) -> Any:
        try:
            return parse(data, *args)
        except _FieldError as exc:
            key, _, problem = str(exc).partition(": ")
            problems.setdefault(key, problem)
            return default

    values: dict[str, Any] = {
        "name": checked(_string, "name", "", default=""),
        "priority": checked(_integer, "priority", 100, default=100),
        "enabled": checked(_boolean, "enabled", True, default=True),
        "calling_aet": checked(_strings, "calling_aet", default=()),
        "called_aet": checked(_strings, "called_aet", default=()),
        "source_ip": checked(_strings, "source_ip", default=()),
        "modality": checked(_strings, "modality", default=()),
        "sop_class": checked(_strings, "sop_class", default=()),
        "match": _conditions(data, problems),
        "destinations": checked(_strings, "destinations", default=()),
        "stop": checked(_boolean, "stop", False, default=False),
        "description": checked(_string, "description", "", default=""),
        "granularity": data.get("granularity"),  # checked by RuleSpec
        "quiet_time": data.get("quiet_time"),
        "expected_count": data.get("expected_count"),
        "amendments": data.get("amendments", "late_only"),
        "transforms": checked(_strings, "transforms", default=()),
    }
    if not values["destinations"] and "destinations" in problems:
        values["stop"] = True  # its problem is said; not "at least one destination" too
    if not values["name"]:
        problems.setdefault("name", "expected a non-empty string")
        values["name"] = "?"  # to check the other fields all the same
    spec: RuleSpec | None = None
    try:
        spec = RuleSpec(**values)
    except RuleError as exc:
        for key, problem in exc.errors.items():
            problems.setdefault(key, problem)
    if problems or spec is None:
        raise RuleError(f"{where}: " + "; ".join(
            f"{key}: {problem}" if key else problem for key, problem in problems.items()),
            problems)
    return spec


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
