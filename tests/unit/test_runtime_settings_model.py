"""Settings described once (issue 17, point 6): a setting that changes at run time is the
settings field itself (storage.retention_days in StorageSettings): its range, words and help
text are the file's for the API body, the settings page and the OpenAPI document; secrets
(WriteOnly in their class) are shown only as set / not set."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.application.commands import CommandError
from router.application.runtime_settings import RUNTIME_SETTINGS
from router.config_check import check_config
from router.config_types import docs_of
from router.settings import StorageSettings, load_settings
from web.api.common import ApiError, validate
from web.api.settings import RuntimeChange, describe


def test_the_runtime_setting_is_the_file_s_field(tmp_path: Path) -> None:
    spec = RUNTIME_SETTINGS["storage.retention_days"]
    assert spec.help == docs_of(StorageSettings)["retention_days"] != ""
    config = tmp_path / "router.toml"
    config.write_text("[storage]\nretention_days = -1\n")
    from_file = check_config(config)
    assert from_file == ["storage.retention_days: must be between 0 and 36500, got -1"]
    # The store, the API body and the file say the same.
    with pytest.raises(CommandError) as refused:
        spec.check(-1)
    assert str(refused.value) == from_file[0]
    with pytest.raises(ApiError) as body:
        validate(RuntimeChange, {"value": -1})
    assert body.value.fields == {"value": "must be between 0 and 36500, got -1"}
    with pytest.raises(ApiError) as text:
        validate(RuntimeChange, {"value": "30"})  # JSON has real types
    assert text.value.fields == {"value": "expected a whole number, got '30'"}
    assert spec.check(30) == 30 and validate(RuntimeChange, {"value": None}).value is None


def test_the_openapi_body_is_made_from_the_field() -> None:
    value = RuntimeChange.model_json_schema()["properties"]["value"]["anyOf"][0]
    assert value == {"type": "integer", "minimum": 0, "maximum": 36500,
                     "description": docs_of(StorageSettings)["retention_days"]}


def test_secrets_of_every_section_are_shown_only_as_set() -> None:
    settings = load_settings({"DICOM_ROUTER_STORAGE_SECRET_ACCESS_KEY": "a-plain-secret",
                              "DICOM_ROUTER_STORAGE_ACCESS_KEY_ID": "AKIAEXAMPLE"})
    shown = describe(settings, {})
    assert "a-plain-secret" not in repr(shown)
    assert shown["sections"]["storage"]["secret_access_key"]["value"] == "set"
    assert shown["sections"]["storage"]["access_key_id"]["value"] == "AKIAEXAMPLE"
    assert shown["sections"]["server"]["admin_password"]["value"] == "not set"


def test_the_openapi_answer_of_get_settings_is_made_from_the_settings_classes() -> None:
    import jsonschema

    from router.application.runtime_settings import RuntimeValue
    from web.api.openapi import build_document
    from web.api.settings import SettingsShown
    from web.routes import all_routes

    document = build_document(all_routes())
    answer = document["paths"]["/api/v1/settings"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SettingsShown"}
    schema = document["components"]["schemas"]["SettingsShown"]
    sections = schema["properties"]["sections"]["properties"]
    storage = sections["storage"]["properties"]
    # A key's value has its field's schema: range and description (Doc) from StorageSettings.
    assert storage["retention_days"]["properties"]["value"] == {
        "type": "integer", "minimum": 0, "maximum": 36500,
        "description": docs_of(StorageSettings)["retention_days"]}
    assert storage["backend"]["properties"]["value"]["enum"] == ["local", "s3"]
    assert storage["secret_access_key"]["properties"]["value"]["enum"] == ["set", "not set"]
    # What GET answers fits it (a secret shown as written would not).
    settings = load_settings({"DICOM_ROUTER_STORAGE_SECRET_ACCESS_KEY": "a-plain-secret",
                              "DICOM_ROUTER_STORAGE_ACCESS_KEY_ID": "AKIAEXAMPLE"})
    runtime = {"storage.retention_days": RuntimeValue(
        "storage.retention_days", 30, 0, True, "admin", 1.7e9, "help")}
    shown = describe(settings, runtime)
    jsonschema.validate(shown, SettingsShown.model_json_schema())
    shown["sections"]["storage"]["secret_access_key"]["value"] = "a-plain-secret"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(shown, SettingsShown.model_json_schema())
