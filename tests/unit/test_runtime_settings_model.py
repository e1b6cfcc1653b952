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
