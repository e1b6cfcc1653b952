"""Validating a TOML settings file without touching any store: every problem, each named,
including destinations and remote nodes the destination policy refuses (docs/security.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from router.application.remote_nodes import RemoteNodeError, parse_remote_node
from router.dispatch.policy import DestinationPolicy
from router.dispatch.registry import DestinationConfigError, check_policy, parse_destination
from router.domain.rules import RuleError, parse_rule
from router.settings import SettingsError, load_settings


def check_config(path: Path) -> list[str]:
    """All problems found in the file (an empty list means it is valid)."""
    try:
        settings = load_settings({}, path)
    except SettingsError as exc:
        return [str(exc)]
    policy = DestinationPolicy.from_settings(settings)
    problems: list[str] = []
    names: list[str] = []
    for i, item in enumerate(settings.destinations):
        # Declared names count even when the item is invalid: a rule naming it is not "unknown",
        # and a second item with the same name is still a duplicate.
        if isinstance(item.get("name"), str):
            names.append(str(item["name"]))
        try:
            check_policy(parse_destination(item), policy)
        except DestinationConfigError as exc:
            problems.append(f"destinations[{i}]: {exc}")
    duplicates = {n for n in names if names.count(n) > 1}
    problems += [f"destination {n!r} is declared more than once" for n in sorted(duplicates)]
    rule_names: list[str] = []
    for i, item in enumerate(settings.rules):
        try:
            spec = parse_rule(item)
        except RuleError as exc:
            problems.append(f"rules[{i}]: {exc}")
            continue
        rule_names.append(spec.name)
        problems += [f"rule {spec.name!r}: unknown destination {d!r}"
                     for d in spec.destinations if d not in names]
    duplicates = {n for n in rule_names if rule_names.count(n) > 1}
    problems += [f"rule {n!r} is declared more than once" for n in sorted(duplicates)]
    default = settings.dispatch.default_destination
    if default and default not in names:
        problems.append(f"dispatch.default_destination {default!r} is not a declared destination")
    return problems + _remote_node_problems(settings.remote_nodes, policy)


def _remote_node_problems(items: tuple[Mapping[str, Any], ...],
                          policy: DestinationPolicy) -> list[str]:
    problems, names, aets = [], [], []
    for i, item in enumerate(items):
        try:
            node = parse_remote_node(item)
            refused = policy.remote_node_problems(node.host, node.port)
            if refused:
                raise RemoteNodeError(refused)
        except RemoteNodeError as exc:
            problems.append(f"remote_nodes[{i}]: {exc}")
            continue
        names.append(node.name)
        aets.append(node.ae_title)
    problems += [f"remote node {n!r} is declared more than once"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"AE title {a!r} is used by more than one remote node"
                 for a in sorted({a for a in aets if aets.count(a) > 1})]
    return problems
