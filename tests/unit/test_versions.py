"""Versions of one rule, destination or user rebuilt from the admin log, what each change
changed, and how configuration rows of the audit trail show it; on an in-memory event store
with the router's own commands."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from router.application import users as users_module
from router.application.commands import Actor
from router.application.versions import changes_at, compare, history
from router.domain.admin import destination_id, rule_id
from router.domain.users import user_id
from tests.unit.test_history import ADMIN, SECRET, World
from web.pages.audit_rows import changes, decoded, present


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setattr(users_module, "BCRYPT_ROUNDS", 4)
    w = World()
    yield w
    w.stores.close()


def make_rule_history(world: World) -> None:
    world.commands.put_destination({"name": "pacs", "type": "file", "path": "/srv/a"}, ADMIN)
    world.commands.put_rule({"name": "CT", "priority": 20, "modality": ["CT"],
                             "description": "CT to PACS", "destinations": ["pacs"]}, ADMIN)
    world.commands.put_rule({"name": "CT", "priority": 20, "modality": ["CT", "MR"],
                             "match": [{"tag": "BodyPartExamined", "op": "eq",
                                        "value": "CHEST"}],
                             "description": "CT and MR chest to PACS",
                             "destinations": ["pacs"]}, Actor("bob", "10.9.9.9"))


def test_a_rule_update_shows_its_changed_conditions_and_description(world: World) -> None:
    make_rule_history(world)
    versions = history(world.stores.admin, rule_id("CT"))
    assert [(v.version, v.event, v.actor) for v in versions] == [
        (1, "Rule.Created", "alice"), (2, "Rule.Updated", "bob")]
    changed = {c.field: (c.before, c.after) for c in
               changes_at(world.stores.admin, rule_id("CT"), 2)}
    assert changed["modality"] == ("CT", "CT\nMR")
    assert changed["description"] == ("CT to PACS", "CT and MR chest to PACS")
    assert changed["match"] == ("", 'BodyPartExamined eq "CHEST"')
    assert "priority" not in changed and "destinations" not in changed
    side_by_side = compare(versions[0], versions[1])
    assert {c.field for c in side_by_side if not c.changed} >= {"priority", "destinations"}


def test_destination_versions_mask_secrets_and_user_versions_carry_no_hashes(
        world: World) -> None:
    config = {"name": "cloud", "type": "s3", "bucket": "imaging", "region": "us-east-1",
              "endpoint_url": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE",
              "secret_access_key": SECRET}
    world.commands.put_destination(config, ADMIN)
    world.commands.put_destination({**config, "bucket": "imaging-2"}, ADMIN)
    world.commands.pause_destination("cloud", ADMIN)
    world.users.add("carol", "radiologist", "carol's password 1", ADMIN)
    world.users.set_role("carol", "operator", ADMIN)
    world.users.set_password("carol", "carol's password 2", ADMIN)
    dest = history(world.stores.admin, destination_id("cloud"))
    assert [c.field for c in changes_at(world.stores.admin, destination_id("cloud"), 2)] == [
        "bucket"]
    assert [(c.field, c.after) for c in changes_at(world.stores.admin,
                                                   destination_id("cloud"), 3)] == [
        ("paused", "yes")]
    carol = history(world.stores.admin, user_id("carol"))
    assert [(c.field, c.before, c.after) for c in
            changes_at(world.stores.admin, user_id("carol"), 2)] == [
        ("role", "radiologist", "operator")]
    assert changes_at(world.stores.admin, user_id("carol"), 3) == []  # a password: no field
    text = repr(dest) + repr(carol)
    assert SECRET not in text and "enc:v1:" not in text and "$2b$" not in text
    assert history(world.stores.admin, rule_id("no such rule")) == []


def test_audit_rows_of_changes_show_them_and_details_are_decoded(world: World) -> None:
    make_rule_history(world)
    row = {"application": "admin", "position": 3, "action": "Rule.Updated",
           "object_id": str(rule_id("CT")), "occurred_at": 1.0,
           "detail": json.dumps({"name": "CT", "version": 2, "priority": 20})}
    session = {"application": "access", "position": 9, "action": "Session.Started",
               "object_id": "x", "occurred_at": 2.0,
               "detail": json.dumps({"expires_at": 1796631429.55, "kind": "cookie"})}
    shown = present([row, session], changes(world.stores.admin, [row, session]))
    assert {c.field for c in shown[0]["changes"]} == {"modality", "match", "description"}
    assert shown[0]["versions"] == f"/audit/versions?object={rule_id('CT')}&a=1&b=2"
    assert shown[0]["label"] == "Rule changed" and shown[1]["label"] == "Logged in"
    assert decoded(session) == [
        {"key": "expires", "text": "", "time": "2026-12-07T08:17:09.550Z"},
        {"key": "kind", "text": "cookie", "time": ""}]
    routed = {"detail": json.dumps({"matched_rules": [
        {"rule_id": "r", "version": 3, "name": "CT"}], "destinations": ["a", "b"]})}
    assert [i["text"] for i in decoded(routed)] == ["CT (version 3)", "a, b"]
