"""Validating a TOML settings file without touching any store: every problem in one run, each
with its path (``dicom.max_associations``, ``destinations[2].port``, ``rules[0].match[1].op``).

Every stage runs whatever the others found: the settings, each destination and the destination
policy (docs/security.md), each transform, each rule and the destinations and transforms it
names, each remote node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from router.application.remote_nodes import RemoteNodeError, parse_remote_node
from router.config_types import join_path
from router.dispatch.policy import DestinationPolicy
from router.dispatch.registry import DestinationConfigError, check_policy, parse_destination
from router.domain.rules import RuleError, parse_rule
from router.settings import SettingsError, read_toml, settings_problems
from router.transforms.spec import TransformError, parse_transform


def check_config(path: Path) -> list[str]:
    """All problems found in the file (an empty list means it is valid)."""
    try:
        doc = read_toml(path)
    except SettingsError as exc:
        return exc.problems
    settings, found = settings_problems(doc, {})
    problems = [str(p) for p in found]
    # The policy depends on [storage] and [security]: judged only when the settings are valid.
    policy = DestinationPolicy.from_settings(settings) if settings is not None else None
    transforms = _transform_problems(doc, problems)
    names = _destination_problems(doc, policy, problems, transforms)
    _rule_problems(doc, names, problems, transforms)
    dispatch = doc.get("dispatch")  # read from the file: checked even if settings are not
    default = dispatch.get("default_destination") if isinstance(dispatch, Mapping) else None
    if isinstance(default, str) and default and default not in names:
        problems.append(f"dispatch.default_destination: {default!r} is not a declared "
                        "destination")
    dicom = doc.get("dicom")
    archive = dicom.get("commitment_destination") if isinstance(dicom, Mapping) else None
    if isinstance(archive, str) and archive and archive not in names:
        problems.append(f"dicom.commitment_destination: {archive!r} is not a declared "
                        "destination")
    _remote_node_problems(doc, policy, problems)
    return problems


def _items(doc: Mapping[str, Any], table: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``([[table]])[i]`` paths and items that are tables (the settings stage reports the
    rest: a value that is not an array of tables)."""
    items = doc.get(table, [])
    for i, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, Mapping):
            yield join_path(table, i), item


def _duplicates(declared: list[tuple[str, str]], what: str) -> list[str]:
    """One problem per later declaration of a value already declared at another path."""
    first: dict[str, str] = {}
    problems = []
    for path, value in declared:
        if value in first:
            problems.append(f"{path}: {what} {value!r} is declared more than once "
                            f"(also {first[value]})")
        first.setdefault(value, path)
    return problems


def _transform_problems(doc: Mapping[str, Any], problems: list[str]) -> set[str]:
    """Each transform's problems; returns the declared names (valid or not)."""
    declared: list[tuple[str, str]] = []
    for path, item in _items(doc, "transforms"):
        if isinstance(item.get("name"), str):
            declared.append((f"{path}.name", str(item["name"])))
        try:
            parse_transform(item)
        except TransformError as exc:
            problems += [f"{join_path(path, key)}: {message}"
                         for key, message in exc.errors.items()]
    problems += _duplicates(declared, "transform")
    return {name for _, name in declared}


def _unknown_transforms(path: str, names: object, known: set[str]) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        return []
    return [f"{path}.transforms[{i}]: unknown transform {n!r}"
            for i, n in enumerate(names) if isinstance(n, str) and n not in known]


def _destination_problems(doc: Mapping[str, Any], policy: DestinationPolicy | None,
                          problems: list[str], transforms: set[str]) -> set[str]:
    """Each destination's problems; returns the declared names. Declared names count even when
    the item is invalid: a rule naming it is not "unknown", and a second item with the same
    name is still a duplicate."""
    declared: list[tuple[str, str]] = []
    for path, item in _items(doc, "destinations"):
        if isinstance(item.get("name"), str):
            declared.append((f"{path}.name", str(item["name"])))
        problems += _unknown_transforms(path, item.get("transforms"), transforms)
        try:
            config = parse_destination(item)
            if policy is not None:
                check_policy(config, policy)
        except DestinationConfigError as exc:
            problems += [f"{join_path(path, key)}: {message}"
                         for key, message in exc.errors.items()]
    problems += _duplicates(declared, "destination")
    return {name for _, name in declared}


def _rule_problems(doc: Mapping[str, Any], destinations: set[str],
                   problems: list[str], transforms: set[str]) -> None:
    declared: list[tuple[str, str]] = []
    for path, item in _items(doc, "rules"):
        # The names it refers to are checked even when the rule has other problems.
        named = item.get("destinations")
        named = [named] if isinstance(named, str) else named if isinstance(named, list) else []
        label = f" (rule {item['name']!r})" if isinstance(item.get("name"), str) else ""
        problems += [f"{path}.destinations[{i}]: unknown destination {d!r}{label}"
                     for i, d in enumerate(named)
                     if isinstance(d, str) and d.strip() and d.strip() not in destinations]
        problems += _unknown_transforms(path, item.get("transforms"), transforms)
        try:
            spec = parse_rule(item)
        except RuleError as exc:
            problems += [f"{join_path(path, key)}: {message}" if key else f"{path}: {message}"
                         for key, message in exc.errors.items()]
            continue
        declared.append((f"{path}.name", spec.name))
    problems += _duplicates(declared, "rule")


def _remote_node_problems(doc: Mapping[str, Any], policy: DestinationPolicy | None,
                          problems: list[str]) -> None:
    names: list[tuple[str, str]] = []
    aets: list[tuple[str, str]] = []
    for path, item in _items(doc, "remote_nodes"):
        try:
            node = parse_remote_node(item)
        except RemoteNodeError as exc:
            problems += [f"{join_path(path, key)}: {message}"
                         for key, message in exc.errors.items()]
            continue
        refused = policy.remote_node_problems(node.host, node.port) if policy else {}
        if refused:
            problems += [f"{join_path(path, key)}: {message}" for key, message in refused.items()]
            continue
        names.append((f"{path}.name", node.name))
        aets.append((f"{path}.ae_title", node.ae_title))
    problems += _duplicates(names, "remote node")
    problems += [p.replace("is declared more than once", "is used by more than one remote node")
                 for p in _duplicates(aets, "AE title")]
