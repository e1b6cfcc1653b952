"""State as of a time: rules, destinations and users rebuilt from the admin events recorded up
to then, on an in-memory event store, with the same commands the router uses."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest

from router.application import users as users_module
from router.application.admin_state import AdminState
from router.application.commands import Actor, Commands
from router.application.history import state_as_of
from router.application.stores import EventStores, StoreConfig
from router.application.users import Users
from router.secrets import SecretBox
from router.settings import WebSettings
from tests.conftest import open_policy

ADMIN = Actor("alice", "10.1.2.3")
SECRET = "wJalrXUtnFEMI-very-secret-key"


class World:
    """An in-memory admin log with the router's commands on it."""

    def __init__(self) -> None:
        self.stores = EventStores(StoreConfig("memory:"))
        self.admin = AdminState(self.stores.admin)
        self.box = SecretBox(bytes(range(32)))
        self.commands = Commands(self.stores, self.admin, self.box, open_policy())
        self.users = Users(self.stores, self.admin, WebSettings())

    def mark(self) -> float:
        """A time strictly between the change just made and the next one."""
        time.sleep(0.005)
        at = time.time()
        time.sleep(0.005)
        return at

    def state(self, at: float) -> Any:
        return state_as_of(self.stores.admin, at)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setattr(users_module, "BCRYPT_ROUNDS", 4)  # fast hashes; same code path
    w = World()
    yield w
    w.stores.close()


def rule(state: Any, name: str) -> Any:
    return next(r for r in state.rules if r.name == name)


def test_a_rule_is_shown_as_it_was_before_a_later_change(world: World) -> None:
    before_anything = world.mark()
    world.commands.put_destination({"name": "pacs", "type": "file", "path": "/srv/a"}, ADMIN)
    world.commands.put_destination({"name": "cloud", "type": "file", "path": "/srv/b"}, ADMIN)
    world.commands.put_rule({"name": "CT", "priority": 20, "modality": ["CT"],
                             "destinations": ["pacs"]}, ADMIN)
    first = world.mark()
    world.commands.put_rule({"name": "CT", "priority": 5, "modality": ["CT", "MR"],
                             "destinations": ["cloud"]}, Actor("bob", "10.9.9.9"))
    second = world.mark()
    world.commands.delete_rule("CT", ADMIN)

    assert world.state(before_anything).rules == ()
    old = rule(world.state(first), "CT")
    assert (old.version, old.spec["priority"], old.spec["modality"], old.spec["destinations"]
            ) == (1, 20, ["CT"], ["pacs"])
    assert old.changed.actor == "alice" and old.changed.source_ip == "10.1.2.3"
    assert old.changed.at <= first and not old.deleted
    new = rule(world.state(second), "CT")
    assert (new.version, new.spec["priority"], new.spec["destinations"]) == (2, 5, ["cloud"])
    assert new.created.actor == "alice" and new.changed.actor == "bob"
    assert rule(world.state(time.time()), "CT").deleted
    # What the router routes with now agrees with the replay as of now.
    assert world.admin.refresh().rules == ()


def test_a_users_old_role_tokens_and_disabled_flag(world: World) -> None:
    world.users.add("admin", "admin", "first admin password", Actor("system"))
    world.users.add("carol", "radiologist", "carol's password 1", ADMIN)
    token = world.users.create_token("carol", "pacs script", ADMIN)
    as_radiologist = world.mark()
    world.users.set_role("carol", "operator", ADMIN)
    world.users.revoke_token("carol", token.token_id, ADMIN)
    world.users.set_disabled("carol", True, ADMIN)
    world.users.set_password("admin", "second admin password", Actor("admin"))
    now = time.time()

    then = next(u for u in world.state(as_radiologist).users if u.name == "carol")
    assert (then.role, then.disabled) == ("radiologist", False)
    assert [(t.label, t.revoked) for t in then.tokens] == [("pacs script", False)]
    later = next(u for u in world.state(now).users if u.name == "carol")
    assert (later.role, later.disabled) == ("operator", True)
    assert [(t.label, t.revoked) for t in later.tokens] == [("pacs script", True)]
    assert [u.name for u in world.state(now).users] == ["admin", "carol"]
    text = repr(dataclasses.asdict(world.state(now)))
    assert "$2b$" not in text and "hash" not in text and token.value not in text


def test_destination_secrets_are_masked_and_pauses_replayed(world: World) -> None:
    world.commands.put_destination({
        "name": "cloud", "type": "s3", "bucket": "imaging", "region": "us-east-1",
        "endpoint_url": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": SECRET}, ADMIN)
    running = world.mark()
    world.commands.pause_destination("cloud", ADMIN)
    paused = world.mark()
    world.commands.delete_destination("cloud", ADMIN)

    then = world.state(running).destinations[0]
    assert (then.name, then.type, then.paused, then.deleted) == ("cloud", "s3", False, False)
    assert then.config["secret_access_key"] == "********"
    assert then.config["bucket"] == "imaging"
    assert world.state(paused).destinations[0].paused
    assert world.state(time.time()).destinations[0].deleted
    for at in (running, paused, time.time()):
        text = repr(dataclasses.asdict(world.state(at)))
        assert SECRET not in text and "enc:v1:" not in text


def test_event_count_and_time_are_reported(world: World) -> None:
    world.commands.put_destination({"name": "pacs", "type": "file", "path": "/srv/a"}, ADMIN)
    at = world.mark()
    world.commands.put_destination({"name": "pacs", "type": "file", "path": "/srv/c"}, ADMIN)
    state = world.state(at)
    assert (state.at, state.events) == (at, 1)
    assert state.destinations[0].config["path"] == "/srv/a"
    assert world.state(time.time()).events == 2


def test_remote_nodes_are_shown_as_they_were(world: World) -> None:
    from router.application.remote_nodes import RemoteNodes, RemoteState

    nodes = RemoteNodes(world.stores, RemoteState(world.stores.admin), open_policy())
    nodes.put({"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}, ADMIN)
    first = world.mark()
    nodes.put({"name": "pacs", "ae_title": "PACS2", "host": "10.0.0.6", "port": 11112}, ADMIN)
    nodes.delete("pacs", ADMIN)

    then = world.state(first).remote_nodes[0]
    assert (then.name, then.version, then.deleted) == ("pacs", 1, False)
    assert (then.config["ae_title"], then.config["port"]) == ("PACS", 104)
    later = world.state(time.time()).remote_nodes[0]
    assert (later.config["ae_title"], later.deleted) == ("PACS2", True)
