"""Rules and destinations the TOML file declares are managed by it: the UI and API refuse to
change them (saying why) until an admin detaches them from the file, which is recorded; after
that a restart, which applies the file again, leaves them as edited. Nothing is silently
reverted: a restart either keeps the edit (detached) or there was no edit (refused).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests

from router.application.commands import Actor
from router.domain.admin import destination_id, rule_id
from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.web_harness import Browser, bearer

MANAGED = "managed by the configuration file"


def file_settings(tmp_path: Path, database_url: str, archive_path: str = "archive") -> Any:
    for folder in ("archive", "other"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return replace(
        make_settings(tmp_path, database_url),
        destinations=(
            {"name": "archive", "type": "file", "path": str(tmp_path / archive_path)},
            {"name": "pacs", "type": "file", "path": str(tmp_path / "archive")},
        ),
        rules=({"name": "ct", "priority": 10, "modality": ["CT"], "destinations": ["archive"]},
               {"name": "mr", "priority": 20, "modality": ["MR"], "destinations": ["pacs"]}),
    )


def rule(router: Any, name: str) -> Any:
    return next(r.spec for r in router.admin.refresh().rules if r.spec.name == name)


def audit(router: Any, action: str) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(
        "SELECT actor, detail FROM audit WHERE action = ? ORDER BY position", (action,))


def test_file_items_are_refused_until_detached_and_stay_detached_after_a_restart(
        web_router: Any, start_router: Any, tmp_path: Path, database_url: str) -> None:
    server = web_router(file_settings(tmp_path, database_url))
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    api = server.url + "/api/v1"

    items = requests.get(f"{api}/rules", headers=admin, timeout=30).json()["items"]
    assert {i["name"]: (i["managed_by_file"], i["detached"]) for i in items} == {
        "ct": (True, False), "mr": (True, False)}
    refused = requests.put(f"{api}/rules/ct", headers=admin, timeout=30,
                           json={"modality": ["CT", "PT"], "destinations": ["archive"]})
    assert refused.status_code == 409 and MANAGED in refused.json()["error"]["message"]
    assert "detach" in refused.json()["error"]["message"]
    assert requests.delete(f"{api}/rules/mr", headers=admin, timeout=30).status_code == 409
    reorder = requests.post(f"{api}/rules/reorder", headers=admin, timeout=30,
                            json={"names": ["mr", "ct"]})
    assert reorder.status_code == 409 and MANAGED in reorder.text
    moved = requests.put(f"{api}/destinations/pacs", headers=admin, timeout=30,
                         json={"type": "file", "path": str(tmp_path / "other")})
    assert moved.status_code == 409 and MANAGED in moved.text
    assert rule(server.router, "ct").modality == ("CT",)

    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    editor = browser.get(browser.url("/rules/ct/edit")).text
    assert f'href="/audit/versions?object={rule_id("ct")}"' in editor  # its history
    assert "Managed by the configuration file." in editor and "/rules/ct/detach" in editor
    saved = browser.post(browser.url("/rules/ct/edit"), data={
        "action": "save", "priority": "10", "modalities": "CT, PT", "destinations": "archive"})
    assert saved.status_code == 409 and MANAGED in saved.text
    unconfirmed = browser.post(browser.url("/rules/ct/detach"), data={"reason": "x"})
    assert unconfirmed.status_code == 422 and "Tick the box" in unconfirmed.text
    detached = browser.post(browser.url("/rules/ct/detach"),
                            data={"confirm": "on", "reason": "tuning PET routing"})
    assert detached.status_code == 200 and "Detached from the configuration file" in (
        detached.text)
    rows = audit(server.router, "Rule.Detached")
    assert len(rows) == 1 and rows[0]["actor"] == "admin"
    assert "tuning PET routing" in rows[0]["detail"]
    changed = requests.put(f"{api}/rules/ct", headers=admin, timeout=30,
                           json={"priority": 10, "modality": ["CT", "PT"],
                                 "destinations": ["archive"]})
    assert changed.status_code == 200, changed.text
    answer = requests.post(f"{api}/destinations/pacs/detach", headers=admin, timeout=30,
                           json={"reason": "moved to the new array"})
    assert answer.status_code == 200 and answer.json()["changed"] is True
    assert requests.put(f"{api}/destinations/pacs", headers=admin, timeout=30, json={
        "type": "file", "path": str(tmp_path / "other")}).status_code == 200
    page = browser.get(browser.url("/destinations/pacs/edit")).text
    assert "Detached from the configuration file" in page
    # The lists say which items the file manages and which were detached (not "apply only")
    for listing, detached_name, managed_name in (("/rules", "ct", "mr"),
                                                 ("/destinations", "pacs", "archive")):
        text = browser.get(browser.url(listing)).text
        assert "later &#39;apply&#39;" not in text and "later 'apply'" not in text
        badges = dict(re.findall(r'<strong>([a-z]+)</strong></a>.*?data-file="([a-z]+)"',
                                 text, re.S))
        assert badges == {detached_name: "detached", managed_name: "managed"}, badges
    archive = browser.get(browser.url("/destinations/archive/edit")).text
    assert "Managed by the configuration file." in archive
    assert f'href="/audit/versions?object={destination_id("archive")}"' in archive

    # Restart with a file that changes every item: the detached ones keep their edits, the
    # others follow the file as before.
    server.router.stop()
    again = start_router(file_settings(tmp_path, database_url, archive_path="other"))
    assert rule(again, "ct").modality == ("CT", "PT")
    destinations = again.admin.refresh().live_destinations()
    assert destinations["pacs"].config["path"] == str(tmp_path / "other")
    assert destinations["archive"].config["path"] == str(tmp_path / "other")
    # A file without them no longer deletes detached items either (dicom-router apply).
    counts = again.commands.apply([], [], Actor("config"))
    assert counts["detached"] == 0 and counts["deleted"] == 2  # archive and mr
    assert {r.spec.name for r in again.admin.refresh().rules} == {"ct"}
    assert set(again.admin.refresh().live_destinations()) == {"pacs"}


def test_file_remote_nodes_are_refused_until_detached(web_router: Any, start_router: Any,
                                                      tmp_path: Path) -> None:
    node = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
            "services": ["find"]}
    settings = replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"),
                       remote_nodes=(node,))
    server = web_router(settings)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    url = server.url + "/api/v1/remote-nodes/pacs"
    shown = requests.get(url, headers=admin, timeout=30).json()
    assert (shown["managed_by_file"], shown["detached"]) == (True, False)
    changed = {**node, "services": ["find", "move"]}
    refused = requests.put(url, headers=admin, timeout=30, json=changed)
    assert refused.status_code == 409 and MANAGED in refused.text
    assert requests.delete(url, headers=admin, timeout=30).status_code == 409
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    assert 'data-file="managed"' in browser.get(browser.url("/remote")).text
    page = browser.post(browser.url("/remote/pacs/edit"), data={
        "ae_title": "PACS", "host": "127.0.0.1", "port": "104", "service_find": "on",
        "service_move": "on"})
    assert page.status_code == 409 and MANAGED in page.text and "/remote/pacs/detach" in (
        page.text)
    detached = browser.post(browser.url("/remote/pacs/detach"),
                            data={"confirm": "on", "reason": "PACS moves to C-MOVE"})
    assert detached.status_code == 200 and "Detached from the configuration file" in (
        detached.text)
    assert requests.put(url, headers=admin, timeout=30, json=changed).status_code == 200
    assert 'data-file="detached"' in browser.get(browser.url("/remote")).text
    rows = audit(server.router, "RemoteNode.Detached")
    assert [r["actor"] for r in rows] == ["admin"] and "PACS moves" in rows[0]["detail"]

    server.router.stop()
    again = start_router(settings)  # the file still says services = ["find"]
    assert again.remote_nodes.state.node("pacs").config.services == ("find", "move")
    assert again.remote_nodes.apply([])["deleted"] == 0
    assert again.remote_nodes.state.node("pacs") is not None
