"""Every API 422 speaks with the configuration file's words and paths (issue 17, point 6): a
plain pydantic body (ReorderBody, FindBody, NewUser...) is refused through the same
``problems_of`` as the TOML file, not with pydantic's own messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from web.api.common import ApiError, validate
from web.api.deliveries import BulkRequest
from web.api.remote import FindBody
from web.api.rules import ReorderBody
from web.api.settings import RuntimeChange
from web.api.users import NewUser


def fields(model: type[BaseModel], data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ApiError) as refused:
        validate(model, data)
    assert refused.value.status == 422
    return refused.value.fields


def test_list_items_are_named_by_index_as_in_the_file() -> None:
    assert fields(ReorderBody, {"names": ["a", 3]}) == {"names[1]": "expected a string, got int"}
    assert fields(ReorderBody, {"names": []}) == {"names": "must have at least 1 item(s)"}
    assert fields(ReorderBody, {}) == {"names": "required"}


def test_unknown_keys_and_mistyped_choices_get_a_did_you_mean() -> None:
    assert fields(FindBody, {"patient_di": "123"}) == {
        "patient_di": "unknown key (did you mean 'patient_id'?)"}
    assert fields(NewUser, {"username": "amy", "password": "x" * 20, "role": "admn"}) == {
        "role": "must be 'admin', 'operator', 'radiologist' or 'auditor', got 'admn' "
                "(did you mean 'admin'?)"}


def test_types_lengths_and_patterns_are_worded_like_the_file_s() -> None:
    # The file's wording for a port given as text: "expected a whole number, got '104'".
    assert fields(RuntimeChange, {"value": "30"}) == {"value": "expected a whole number, got '30'"}
    assert fields(BulkRequest, {"all": "maybe", "reason": "x" * 501, "destination": ""}) == {
        "destination": "must not be empty",
        "all": "expected true or false, got 'maybe'",
        "reason": "must be at most 500 characters"}
    assert fields(FindBody, {"patient_name": "a\\b"}) == {
        "patient_name": "must match ^[^\\\\]*$"}
