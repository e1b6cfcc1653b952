"""A remote node is described once (router/application/remote_nodes.py, RemoteNodeConfig): the
TOML file's [[remote_nodes]] and the API's bodies go through the same parser, so a bad field
gets the same message from both, and the OpenAPI document's model is made from the same class.
"""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Any

import pytest
import requests

from router.application.remote_nodes import (
    RemoteNodeConfig,
    RemoteNodeError,
    parse_remote_node,
)
from router.config_types import docs_of
from tests.conftest import ADMIN_PASSWORD
from tests.web_harness import Browser, bearer

BAD = {"name": "pacs", "ae_tittle": "PACS", "host": "pacs.example", "port": "104",
       "services": ["find", "store"]}


def file_problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(RemoteNodeError) as caught:
        parse_remote_node(data)
    return caught.value.errors


def test_a_bad_body_gets_the_configuration_file_s_messages(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    api = server.url + "/api/v1/remote-nodes"
    answer = requests.post(api, json=BAD, headers=admin, timeout=30)
    assert answer.status_code == 422, answer.text
    fields = answer.json()["error"]["fields"]
    expected = file_problems(BAD)
    assert fields == expected
    assert "did you mean 'ae_title'" in fields["ae_tittle"]
    assert set(fields) == {"ae_tittle", "ae_title", "port", "services[1]"}

    replaced = requests.put(api + "/pacs", json={**BAD, "name": "other"}, headers=admin,
                            timeout=30)
    assert replaced.status_code in (404, 422)  # no such node; a body naming another one


def test_a_body_without_services_may_ask_nothing_of_us(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    api = server.url + "/api/v1/remote-nodes"
    body = {"name": "viewer", "ae_title": "VIEWER", "host": "viewer.example", "port": 11112}
    created = requests.post(api, json=body, headers=admin, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["services"] == []
    replaced = requests.put(api + "/viewer", json={**body, "services": ["find"]},
                            headers=admin, timeout=30)
    assert replaced.status_code == 200 and replaced.json()["services"] == ["find"]
    again = requests.put(api + "/viewer", json=body, headers=admin, timeout=30)
    assert again.json()["services"] == []  # a replacement: what the body leaves out is reset
    # The file keeps its own default (all three) for nodes declared before services existed.
    assert parse_remote_node({k: v for k, v in body.items()}).services == ("find", "move",
                                                                            "get")


def test_the_openapi_model_is_the_configuration_class(web_router: Any) -> None:
    server = web_router()
    document = requests.get(server.url + "/api/v1/openapi.json", timeout=10).json()
    model = document["components"]["schemas"]["RemoteNode"]
    assert set(model["properties"]) == {f.name for f in dataclasses.fields(RemoteNodeConfig)}
    assert model["additionalProperties"] is False
    assert set(model["required"]) == {"ae_title", "host", "port"}  # the name: from the URL
    assert model["properties"]["port"]["maximum"] == 65535
    assert "least privilege" in model["properties"]["services"]["description"]
    assert "PEM" in model["properties"]["tls_certificate"]["description"]


def test_the_form_shows_each_problem_at_its_field(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    bad = browser.post(browser.url("/remote/new"), data={
        "name": "pacs", "ae_title": "A\\B", "host": "not a host!", "port": "70000",
        "tls": "on", "tls_profile": "tls10"})
    assert bad.status_code == 422
    shown = dict(re.findall(r'<input id="([a-z_]+)"[^>]*>(?:\s*<span class="muted">[^<]*</span>)?'
                            r'\s*<div class="flash error">([^<]*)</div>', bad.text))
    expected = {key: html.escape(message) for key, message in file_problems({
        "name": "pacs", "ae_title": "A\\B", "host": "not a host!", "port": 70000,
        "tls": True, "tls_profile": "tls10"}).items()}
    assert shown == expected and {"ae_title", "host", "port"} <= set(shown), bad.text
    # Help texts are the class's descriptions (the OpenAPI document's too).
    assert html.escape(docs_of(RemoteNodeConfig)["tls_server_name"]) in bad.text
