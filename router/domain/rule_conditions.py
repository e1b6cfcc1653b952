"""One tag condition of a routing rule: its validation, compilation and evaluation.

Tags, operators, regexes and comparison values are resolved once when a :class:`Condition` is
built, so evaluating it in the C-STORE path only reads one element and compares.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from collections.abc import Callable, Mapping
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, TypeVar

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

T = TypeVar("T")
Atoms = tuple[object, ...]
Predicate = Callable[[Atoms], bool]
Scalar = str | int | float | bool

OPERATORS = ("eq", "ne", "in", "contains", "startswith", "regex", "exists", "lt", "gt", "le", "ge")
_STRING_OPS = frozenset({"eq", "ne", "in", "contains", "startswith", "regex"})
_ORDERINGS: dict[str, Callable[[Any, Any], bool]] = {
    op: getattr(operator, op) for op in ("lt", "gt", "le", "ge")
}
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})

_HEX_TAG = re.compile(
    r"^(?:\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)"
    r"|([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4}))$"
)
_AI_TAG = re.compile(r"^ai\.([^.\s]+)\.(\S+)$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_DA = re.compile(r"^(\d{4})[-.]?(\d{2})[-.]?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DT = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"([+-]\d{4})?$"
)


class RuleError(ValueError):
    """A routing rule or one of its conditions is invalid; the message names the field, and
    ``errors`` maps the field's path in the rule (``match[1].op``; "" for the whole rule) to
    the problem."""

    def __init__(self, message: str, errors: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors) if errors is not None else {"": message}


class ConditionError(RuleError):
    """A condition is invalid; ``str()`` is ``"<field>: <problem>"`` (several joined by
    ``; ``), ``errors`` maps each field (``op``, ``value[1]``) to its problem."""


def _problem(key: str, message: str) -> ConditionError:
    return ConditionError(f"{key}: {message}", {key: message})


def _raise_all(problems: Mapping[str, str]) -> None:
    if problems:
        raise ConditionError("; ".join(f"{key}: {message}" if key else message
                                       for key, message in problems.items()), problems)


# -- reading values --------------------------------------------------------------------------


def _is_blank(value: object) -> bool:
    return value is None or text_of(value) == ""


def text_of(atom: object) -> str | None:
    """The string form used by string operators; ``None`` for values that have none."""
    if isinstance(atom, str):
        return atom.rstrip(" \x00")
    if isinstance(atom, bool):
        return "true" if atom else "false"
    if isinstance(atom, bytes):
        return atom.decode("latin-1").rstrip(" \x00")
    if isinstance(atom, Dataset | Mapping):
        return None
    return str(atom)


def _atoms(value: object) -> Atoms | None:
    """Non-blank values of an element or extra (VM > 1 gives several); None when empty."""
    # pydicom's MultiValue and Sequence are abc sequences, not lists.
    if isinstance(value, AbcSequence) and not isinstance(value, str | bytes):
        atoms = tuple(v for v in value if not _is_blank(v))
    elif isinstance(value, Mapping):
        atoms = (value,) if value else ()
    else:
        atoms = () if _is_blank(value) else (value,)
    return atoms or None


def dataset_values(dataset: Dataset, tag: BaseTag) -> Atoms | None:
    """Non-blank values of one element (file meta for group 0002); None when missing or empty."""
    source = dataset.file_meta if tag.group == 2 and hasattr(dataset, "file_meta") else dataset
    try:
        element = source.get(tag)
        return None if element is None else _atoms(element.value)
    except Exception:  # a malformed element from a modality must not break routing
        return None


def _extra_atoms(extra: Mapping[str, object], key: str) -> Atoms | None:
    if key in extra:
        return _atoms(extra[key])
    node: object = extra
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return _atoms(node)


# -- converting for ordering operators -----------------------------------------------------------


def to_number(atom: object) -> int | float | None:
    """A number from a numeric value or a decimal string; None when it is neither."""
    if isinstance(atom, bool):
        return None
    if isinstance(atom, int | float):
        return atom
    text = text_of(atom)
    if text is None or not _NUMBER.match(text.strip()):
        return None
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def to_date(atom: object) -> date | None:
    """A date from a DA value (``YYYYMMDD``) or ``YYYY-MM-DD``."""
    if isinstance(atom, datetime):
        return atom.date()
    if isinstance(atom, date):
        return atom
    m = _DA.match((text_of(atom) or "").strip())
    try:
        return date(int(m[1]), int(m[2]), int(m[3])) if m else None
    except ValueError:
        return None


def to_time(atom: object) -> time | None:
    """A time from a TM value (``HH[MM[SS[.F]]]``) or ``HH:MM[:SS]``."""
    if isinstance(atom, datetime):
        return atom.time()
    if isinstance(atom, time):
        return atom
    m = _TM.match((text_of(atom) or "").strip())
    if not m:
        return None
    micro = int((m[4] or "0").ljust(6, "0"))
    try:
        return time(int(m[1]), int(m[2] or 0), min(int(m[3] or 0), 59), micro)
    except ValueError:
        return None


def to_datetime(atom: object) -> datetime | None:
    """A datetime from a DT value (``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``) or ISO 8601."""
    if isinstance(atom, datetime):
        return atom
    if isinstance(atom, date):
        return datetime.combine(atom, time())
    text = (text_of(atom) or "").strip()
    m = _DT.match(text)
    if not m:
        try:
            return datetime.fromisoformat(text) if text else None
        except ValueError:
            return None
    try:
        year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        hour, minute, second = int(m[4] or 0), int(m[5] or 0), min(int(m[6] or 0), 59)
        micro = int((m[7] or "0").ljust(6, "0"))
        tz = _offset(m[8]) if m[8] else None
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


def _offset(text: str) -> timezone:
    sign = -1 if text[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(text[1:3]), minutes=int(text[3:5])))


def _compare_datetimes(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def both_aware_or_wall_clock(actual: datetime, expected: datetime) -> bool:
        if (actual.tzinfo is None) != (expected.tzinfo is None):
            actual, expected = actual.replace(tzinfo=None), expected.replace(tzinfo=None)
        return compare(actual, expected)

    return both_aware_or_wall_clock


_CONVERTERS: dict[str, Callable[[object], object]] = {
    "number": to_number,
    "date": to_date,
    "time": to_time,
    "datetime": to_datetime,
}
_KIND_BY_VR = {"DA": "date", "TM": "time", "DT": "datetime"}
_KIND_NAMES = {
    "number": "a number",
    "date": "a date (YYYYMMDD or YYYY-MM-DD)",
    "time": "a time (HHMMSS or HH:MM:SS)",
    "datetime": "a date-time (YYYYMMDDHHMMSS or ISO 8601)",
}


# -- compiling operators -------------------------------------------------------------------------


def _equality(values: tuple[Scalar, ...], case_sensitive: bool) -> Predicate:
    """Any value equal to one of ``values``; VM > 1 also compares the backslash-joined value.

    Numeric elements also compare numerically (DS ``"5.000000"`` equals ``5``); text elements
    only when the rule gave a number, so identifiers such as ``"00123"`` keep their zeros.
    """
    fold: Callable[[str], str] = (lambda s: s) if case_sensitive else str.casefold
    texts = frozenset(fold(text_of(v) or "") for v in values)
    joined = any("\\" in t for t in texts)
    loose = frozenset(n for v in values if (n := to_number(v)) is not None)
    strict = frozenset(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))

    def any_equal(atoms: Atoms) -> bool:
        for atom in atoms:
            text = text_of(atom)
            if text is not None and fold(text) in texts:
                return True
            numbers = loose if isinstance(atom, int | float) else strict
            if numbers and not isinstance(atom, bool) and to_number(atom) in numbers:
                return True
        if joined and len(atoms) > 1:
            return fold("\\".join(text_of(a) or "" for a in atoms)) in texts
        return False

    return any_equal


def _textual(op: str, value: str, case_sensitive: bool) -> Predicate:
    """``contains``, ``startswith`` or ``regex`` on the string form of any value."""
    flags = 0 if case_sensitive else re.IGNORECASE
    pattern = re.compile(value if op == "regex" else re.escape(value), flags)
    find = pattern.search if op in ("regex", "contains") else pattern.match

    def any_found(atoms: Atoms) -> bool:
        return any((text := text_of(a)) is not None and find(text) for a in atoms)

    return any_found


def _ordering(op: str, kind: str, expected: object) -> Predicate:
    """``lt``/``gt``/``le``/``ge`` on any value that converts to ``kind``."""
    convert = _CONVERTERS[kind]
    compare = _ORDERINGS[op]
    if kind == "datetime":
        compare = _compare_datetimes(compare)

    def any_ordered(atoms: Atoms) -> bool:
        for atom in atoms:
            actual = convert(atom)
            try:
                if actual is not None and compare(actual, expected):
                    return True
            except TypeError:  # e.g. an aware time from an extra against a naive one
                continue
        return False

    return any_ordered


def _ordering_kind(tag: str, vr: str | None, value: object) -> str:
    if vr in _KIND_BY_VR:
        return _KIND_BY_VR[vr]
    if vr is not None and any(v in _NUMERIC_VRS for v in vr.split(" or ")):
        return "number"
    for kind in ("number", "date", "datetime"):
        if _CONVERTERS[kind](value) is not None:
            return kind
    raise _problem("value", f"{value!r} is neither a number nor a date, cannot order {tag}")


def _compile(op: str, value: object, tag: str, vr: str | None, case_sensitive: bool) -> Predicate:
    if op in ("eq", "ne", "in"):
        values = value if isinstance(value, tuple) else (value,)
        equal = _equality(values, case_sensitive)
        return (lambda atoms: not equal(atoms)) if op == "ne" else equal
    if op in ("contains", "startswith", "regex"):
        assert isinstance(value, str)
        try:
            return _textual(op, value, case_sensitive)
        except re.error as exc:
            raise _problem("value", f"invalid regular expression {value!r}: {exc}") from None
    if op in _ORDERINGS:
        kind = _ordering_kind(tag, vr, value)
        expected = _CONVERTERS[kind](value)
        if expected is None:
            what = f"{tag} is {vr}" if vr else tag
            raise _problem("value", f"{value!r} is not {_KIND_NAMES[kind]} ({what})")
        return _ordering(op, kind, expected)
    return _never  # exists is answered from presence alone


def _never(atoms: Atoms) -> bool:
    return False


# -- validating ------------------------------------------------------------------------------


def resolve_tag(tag: str) -> tuple[BaseTag | None, str | None, str | None]:
    """``(dataset tag, extra key, dictionary VR)`` for a keyword, hex tag or ``ai.<dest>.<key>``."""
    if _AI_TAG.match(tag):
        return None, tag, None
    if tag.startswith("ai."):
        raise _problem("tag", f"{tag!r} is not of the form ai.<destination>.<key>")
    m = _HEX_TAG.match(tag.strip())
    if m:
        group, element = (m[1], m[2]) if m[1] else (m[3], m[4])
        number = BaseTag(int(group + element, 16))
    elif (found := tag_for_keyword(tag)) is not None:
        number = BaseTag(found)
    else:
        raise _problem("tag", f"unknown tag {tag!r} (expected a DICOM keyword such as "
                       "'Modality', '(gggg,eeee)' or 'ai.<destination>.<key>')")
    try:
        vr: str | None = dictionary_VR(number)
    except KeyError:
        vr = None  # private or unknown: values are compared as they come
    return number, None, vr


def _scalar(value: object, what: str) -> Scalar:
    if not isinstance(value, str | int | float | bool):
        raise _problem(what, f"expected a string, number or boolean, got {value!r}")
    return value


def _normalise(op: str, value: object) -> object:
    """The value in its stored form (lists become tuples, TOML dates ISO strings)."""
    if op == "exists":
        if not isinstance(value, bool):
            raise _problem("value", f"expected true or false for 'exists', got {value!r}")
        return value
    if value is None:
        raise _problem("value", f"required for op '{op}'")
    if op == "in":
        if not isinstance(value, list | tuple) or not value:
            raise _problem("value", f"expected a non-empty list for 'in', got {value!r}")
        return tuple(_scalar(v, f"value[{i}]") for i, v in enumerate(value))
    if isinstance(value, list | tuple):
        raise _problem("value", f"expected a single value for '{op}' (use 'in' for a list)")
    if op in ("contains", "startswith", "regex"):
        if not isinstance(value, str) or not value:
            raise _problem("value", f"expected a non-empty string for '{op}', got {value!r}")
        return value
    if op in _ORDERINGS:
        if isinstance(value, date | time):  # TOML dates and times arrive as objects
            return value.isoformat()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _problem("value", f"expected a number or a date for '{op}', got {value!r}")
        return value
    return _scalar(value, "value")


def _tag_of(tag: object) -> tuple[BaseTag | None, str | None, str | None]:
    if not isinstance(tag, str) or not tag:
        raise _problem("tag", f"expected a non-empty string, got {tag!r}")
    return resolve_tag(tag)


def _checked(problems: dict[str, str], check: Callable[[], T]) -> T | None:
    """``check()``, or None with its problems added to ``problems``."""
    try:
        return check()
    except ConditionError as exc:
        problems.update(exc.errors)
        return None


# -- the condition ---------------------------------------------------------------------------

_CONDITION_KEYS = ("tag", "op", "value", "case_sensitive")


@dataclass(frozen=True)
class Condition:
    """``tag op value``: validated and compiled on construction (raises :class:`ConditionError`).

    ``value`` is stored normalised: a tuple for ``in``, ISO strings for TOML dates and times.
    """

    tag: str
    op: str
    value: object
    case_sensitive: bool = True
    _tag: BaseTag | None = field(default=None, init=False, repr=False, compare=False)
    _extra_key: str = field(default="", init=False, repr=False, compare=False)
    _test: Predicate = field(default=_never, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every independent problem is said at once: the tag and the operator each on their
        # own; the value only against a valid operator (and the tag's VR when there is one).
        problems: dict[str, str] = {}
        tag = _checked(problems, lambda: _tag_of(self.tag))
        op_ok = self.op in OPERATORS
        if not op_ok:
            expected = ", ".join(OPERATORS)
            problems["op"] = f"unknown operator {self.op!r} (expected one of {expected})"
        elif tag is not None and tag[2] == "SQ" and self.op != "exists":
            problems["op"] = f"{self.tag} is a sequence; only 'exists' is supported"
        value: object = self.value
        test: Predicate = _never
        if "op" not in problems:
            vr = tag[2] if tag is not None else None
            named = self.tag if isinstance(self.tag, str) and self.tag else "the tag"
            normal = _checked(problems, lambda: (_normalise(self.op, self.value),))
            if normal is not None:
                value = normal[0]
                compiled = _checked(problems, lambda: _compile(
                    self.op, value, named, vr, self.case_sensitive is not False))
                test = compiled if compiled is not None else _never
        if not isinstance(self.case_sensitive, bool):
            problems["case_sensitive"] = f"expected true or false, got {self.case_sensitive!r}"
        elif not self.case_sensitive and op_ok and self.op not in _STRING_OPS:
            problems["case_sensitive"] = f"does not apply to '{self.op}'"
        _raise_all(problems)
        assert tag is not None
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "_tag", tag[0])
        object.__setattr__(self, "_extra_key", tag[1] or "")
        object.__setattr__(self, "_test", test)

    def __reduce__(self) -> tuple[type[Condition], tuple[str, str, object, bool]]:
        # The compiled predicate is a closure; rebuild it rather than pickle it.
        return (Condition, (self.tag, self.op, self.value, self.case_sensitive))

    def values(self, dataset: Dataset, extra: Mapping[str, object]) -> Atoms | None:
        """The non-blank values this condition looks at; None when missing or empty."""
        if self._tag is not None:
            return dataset_values(dataset, self._tag)
        return _extra_atoms(extra, self._extra_key)

    @property
    def source(self) -> BaseTag | str:
        """Where the values come from: a dataset tag or an ``extra`` key (for memoising)."""
        return self._tag if self._tag is not None else self._extra_key

    def matches(self, dataset: Dataset, extra: Mapping[str, object]) -> bool:
        """True when the condition holds; never raises for any element value."""
        return self.holds_for(self.values(dataset, extra))

    def holds_for(self, atoms: Atoms | None) -> bool:
        """True when the condition holds for values already read with :meth:`values`."""
        if self.op == "exists":
            return (atoms is not None) is self.value
        if atoms is None:
            return self.op == "ne"
        return self._test(atoms)

    def label(self) -> str:
        """A short human-readable form, e.g. ``BodyPartExamined eq "CHEST"``."""
        if self.op == "exists":
            return f"{self.tag} exists" if self.value else f"{self.tag} does not exist"
        shown = list(self.value) if isinstance(self.value, tuple) else self.value
        suffix = " (case-insensitive)" if not self.case_sensitive else ""
        return f"{self.tag} {self.op} {json.dumps(shown, ensure_ascii=False)}{suffix}"

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form accepted by :func:`parse_condition`."""
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        out: dict[str, object] = {"tag": self.tag, "op": self.op, "value": value}
        if not self.case_sensitive:
            out["case_sensitive"] = False
        return out


def parse_condition(data: object) -> Condition:
    """A :class:`Condition` from a TOML/JSON table; unknown keys are an error. Raises
    :class:`ConditionError` naming every problem found (``errors``: key -> problem)."""
    if not isinstance(data, Mapping):
        raise ConditionError(f"expected a table with tag, op and value, got {data!r}")
    problems: dict[str, str] = {}
    tag: Any = data["tag"].strip() if isinstance(data.get("tag"), str) else data.get("tag")
    op: Any = data.get("op")
    value = data.get("value", True if op == "exists" else None)
    try:
        condition = Condition(tag, op, value, data.get("case_sensitive", True))
    except ConditionError as exc:
        problems.update(exc.errors)
    for key in ("tag", "op"):
        if key not in data:
            problems[key] = "required"
    for key in sorted(str(k) for k in data if k not in _CONDITION_KEYS):
        close = difflib.get_close_matches(key, _CONDITION_KEYS, n=1)
        problems[key] = "unknown key (" + (
            f"did you mean '{close[0]}'?" if close
            else f"expected one of {', '.join(_CONDITION_KEYS)}") + ")"
    _raise_all(problems)
    return condition


def actual_text(atoms: Atoms | None) -> str | None:
    """Values as one string (VM > 1 joined with backslashes) for explanations."""
    if atoms is None:
        return None
    return "\\".join(text if (text := text_of(a)) is not None else "<item>" for a in atoms)
