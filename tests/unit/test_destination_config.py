"""Destination config parsing, sealing of secrets, display masking and adapter building."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from router.dispatch.dicom import DicomAdapter, DicomDestinationConfig
from router.dispatch.file import DEFAULT_FILE_TEMPLATE, FileAdapter, FileDestinationConfig
from router.dispatch.registry import (
    DESTINATION_KINDS,
    MASK,
    DestinationConfigError,
    build_adapter,
    open_config,
    parse_destination,
    public_config,
    seal_config,
)
from router.dispatch.s3 import S3Adapter, S3DestinationConfig
from router.secrets import SecretBox
from tests.conftest import open_policy

BOX = SecretBox(bytes(range(32)))
POLICY = open_policy()

# The shapes of docs/ARCHITECTURE.md section 5, which users and tests rely on.
PACS = {"name": "pacs", "type": "dicom", "host": "10.0.0.5", "port": 104, "ae_title": "PACS"}
ARCHIVE = {"name": "archive", "type": "file", "path": "/srv/dicom-archive"}
CLOUD = {
    "name": "cloud",
    "type": "s3",
    "bucket": "imaging",
    "prefix": "site-a/",
    "endpoint_url": "http://minio:9000",
    "region": "us-east-1",
    "access_key_id": "AKIAEXAMPLE",
    "secret_access_key": "wJalrXUtnFEMI/K7MDENG",
}


def _errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(DestinationConfigError) as caught:
        parse_destination(data)
    return caught.value.errors


def test_the_documented_examples_parse_with_defaults() -> None:
    pacs = parse_destination(PACS)
    assert isinstance(pacs, DicomDestinationConfig)
    assert (pacs.timeout, pacs.idle_close, pacs.max_pdu, pacs.concurrency) == (30.0, 5.0, 0, 2)
    assert pacs.calling_ae is None and pacs.enabled
    archive = parse_destination(ARCHIVE)
    assert isinstance(archive, FileDestinationConfig)
    assert archive.template == DEFAULT_FILE_TEMPLATE and archive.concurrency == 2
    cloud = parse_destination(CLOUD)
    assert isinstance(cloud, S3DestinationConfig)
    assert cloud.multipart_threshold == 16 * 1024 * 1024 and cloud.concurrency == 4
    assert set(DESTINATION_KINDS) == {"dicom", "file", "s3", "ai"}


def test_the_documented_ai_example_parses_and_seals_its_secret() -> None:
    from router.dispatch.ai import AIDestinationConfig

    lungai = parse_destination({
        "name": "lungai", "type": "ai", "url": "https://ai.example.org/v1/studies",
        "secret": "a vendor secret of some length", "send": "dicomweb",
        "callback_timeout": "2h", "granularity": "study"})
    assert isinstance(lungai, AIDestinationConfig)
    assert (lungai.callback_timeout, lungai.quiet_time, lungai.deidentify) == (7200.0, None,
                                                                              False)
    with pytest.raises(DestinationConfigError) as refused:
        parse_destination({"name": "x", "type": "ai", "url": "ftp://a", "secret": "short",
                           "send": "dicomweb", "deidentify": True, "granularity": "patient"})
    assert set(refused.value.errors) == {"url", "secret", "deidentify", "granularity"}


def test_durations_accept_units() -> None:
    pacs = parse_destination({**PACS, "timeout": "2m", "idle_close": 0.5})
    assert isinstance(pacs, DicomDestinationConfig)
    assert (pacs.timeout, pacs.idle_close) == (120.0, 0.5)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"name": ""}, "name", "1-64 characters"),
        ({"name": "a b"}, "name", "1-64 characters"),
        ({"name": "x" * 65}, "name", "1-64 characters"),
        ({"name": 5}, "name", "1-64 characters"),
        ({"type": "webhook"}, "type", "unknown type 'webhook'; one of ai, dicom, file, s3"),
        ({"type": None}, "type", "required"),
        ({"colour": "red"}, "colour", "unknown key for a dicom destination"),
        ({"host": None}, "host", "expected a string"),
        ({"host": "bad host!"}, "host", "host name or an IP address"),
        ({"port": "104"}, "port", "whole number"),
        ({"port": True}, "port", "whole number"),
        ({"port": 0}, "port", "between 1 and 65535"),
        ({"port": 70000}, "port", "between 1 and 65535"),
        ({"ae_title": "A" * 17}, "ae_title", "1-16 printable"),
        ({"ae_title": "BAD\\AE"}, "ae_title", "no backslash"),
        ({"ae_title": "   "}, "ae_title", "1-16 printable"),
        ({"calling_ae": "ÄE"}, "calling_ae", "1-16 printable"),
        ({"timeout": "soon"}, "timeout", "duration"),
        ({"timeout": 0}, "timeout", "more than 0"),
        ({"idle_close": -1}, "idle_close", "duration"),
        ({"idle_close": 7200}, "idle_close", "between 0 and 3600"),
        ({"max_pdu": 100}, "max_pdu", "0 \\(unlimited\\) or at least 4096"),
        ({"concurrency": 0}, "concurrency", "between 1 and 16"),
        ({"concurrency": 17}, "concurrency", "between 1 and 16"),
        ({"enabled": "yes"}, "enabled", "true or false"),
        ({"description": "x" * 501}, "description", "at most 500"),
    ],
)
def test_dicom_field_errors(changes: dict[str, Any], field: str, message: str) -> None:
    errors = _errors({**PACS, **changes})
    assert field in errors
    assert re.search(message, errors[field]), errors[field]


def test_name_and_type_go_through_the_models_with_the_other_fields() -> None:
    # A mistyped type gets a did-you-mean, and the name is judged all the same.
    assert _errors({"name": "my pacs", "type": "dciom", "host": "10.0.0.5"}) == {
        "name": "invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)",
        "type": "unknown type 'dciom'; did you mean 'dicom'?"}
    assert _errors({"host": "10.0.0.5"}) == {
        "name": "required: 1-64 characters of A-Z a-z 0-9 _ . -",
        "type": "required: one of ai, dicom, file, s3"}
    # With a known type the name is one field of the kind's class, listed with the others...
    assert _errors({**PACS, "name": "a b", "port": 0, "colour": "red"}) == {
        "name": "invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)",
        "port": "must be between 1 and 65535, got 0",
        "colour": "unknown key for a dicom destination (expected one of ae_title, calling_ae, "
                  "concurrency, description, enabled, host, idle_close, max_pdu, name, port, "
                  "timeout, tls, tls_ca_certificates, tls_certificate, tls_private_key, "
                  "tls_profile, tls_server_name, transforms)"}
    # ... and what needs several fields is still judged when only the name is wrong.
    assert _errors({**PACS, "name": "a b", "max_pdu": 100}) == {
        "name": "invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)",
        "max_pdu": "must be 0 (unlimited) or at least 4096 bytes"}
    # One description: the name's help text and its OpenAPI schema come from the annotation.
    from router.config_types import docs_of

    for kind in DESTINATION_KINDS.values():
        assert "1-64 characters" in docs_of(kind.config_class)["name"]


def test_missing_required_fields_are_all_reported() -> None:
    errors = _errors({"name": "pacs", "type": "dicom"})
    assert errors == {"host": "required", "port": "required", "ae_title": "required"}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"path": "relative/folder"}, "path", "absolute"),
        ({"path": "/srv/../etc"}, "path", "'..'"),
        ({"path": "/"}, "path", "root"),
        ({"template": "/abs/{SOPInstanceUID}"}, "template", "relative"),
        ({"template": "{NoSuchKeyword}.dcm"}, "template", "not a DICOM keyword"),
        ({"template": "../{SOPInstanceUID}"}, "template", "'..'"),
        ({"path": None}, "path", "expected a string"),
        ({"bucket": "x"}, "bucket", "unknown key for a file destination"),
    ],
)
def test_file_field_errors(changes: dict[str, Any], field: str, message: str) -> None:
    errors = _errors({**ARCHIVE, **changes})
    assert field in errors
    assert message in errors[field]


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"bucket": "Imaging_Bucket"}, "bucket", "valid bucket name"),
        ({"bucket": "ab"}, "bucket", "valid bucket name"),
        ({"prefix": "/site-a/"}, "prefix", "start with '/'"),
        ({"prefix": "a/../b/"}, "prefix", "'..'"),
        ({"prefix": "a b/"}, "prefix", "letters, digits"),
        ({"endpoint_url": "ftp://minio:21"}, "endpoint_url", "http:// or https://"),
        ({"endpoint_url": "http://user:pw@minio:9000"}, "endpoint_url", "credentials"),
        ({"endpoint_url": "http://minio:99999"}, "endpoint_url", "not a valid URL"),
        ({"endpoint_url": "minio:9000"}, "endpoint_url", "http:// or https://"),
        ({"region": "US East"}, "region", "us-east-1"),
        ({"access_key_id": ""}, "access_key_id", "empty"),
        ({"secret_access_key": MASK}, "secret_access_key", "enter the secret again"),
        ({"storage_class": "CHEAP"}, "storage_class", "STANDARD"),
        ({"multipart_threshold": 1024}, "multipart_threshold", "5 MiB"),
        ({"template": "{PixelData}"}, "template", "binary"),
    ],
)
def test_s3_field_errors(changes: dict[str, Any], field: str, message: str) -> None:
    errors = _errors({**CLOUD, **changes})
    assert field in errors
    assert message in errors[field]


def test_the_error_message_names_the_destination_and_every_field() -> None:
    with pytest.raises(DestinationConfigError) as caught:
        parse_destination({**PACS, "port": 0, "ae_title": "A" * 20, "extra": 1})
    text = str(caught.value)
    assert text.startswith("destination 'pacs': ")
    for field in ("port", "ae_title", "extra"):
        assert f"{field}: " in text
    assert isinstance(caught.value, ValueError)


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(DestinationConfigError, match="table"):
        parse_destination(["pacs"])  # type: ignore[arg-type]


def test_sealed_config_is_json_safe_and_hides_secrets() -> None:
    stored = seal_config(parse_destination({**CLOUD, "session_token": "tok"}), BOX)
    text = json.dumps(stored)
    assert "wJalrXUtnFEMI" not in text and '"tok"' not in text
    assert stored["name"] == "cloud" and stored["type"] == "s3"
    assert stored["access_key_id"] == "AKIAEXAMPLE"  # an identifier, not a secret
    assert BOX.open(str(stored["secret_access_key"]), context="cloud/secret_access_key")
    public = public_config(stored)
    assert public["secret_access_key"] == MASK and public["session_token"] == MASK
    assert public["bucket"] == "imaging"


def test_stored_configs_parse_again_and_build_their_adapter() -> None:
    stored = seal_config(parse_destination(CLOUD), BOX)
    assert parse_destination(stored) is not None  # sealed values are valid strings
    adapter = build_adapter(stored, BOX, calling_ae="ROUTER", policy=POLICY)
    assert isinstance(adapter, S3Adapter)
    adapter.close()
    archive = seal_config(parse_destination(ARCHIVE), BOX)
    assert isinstance(build_adapter(archive, BOX, calling_ae="R", policy=POLICY), FileAdapter)


def test_dicom_adapter_uses_the_router_ae_title_unless_configured() -> None:
    stored = seal_config(parse_destination(PACS), BOX)
    assert "calling_ae" not in stored  # unset optional values are not stored
    adapter = build_adapter(stored, BOX, calling_ae="DICOMROUTER", policy=POLICY)
    assert isinstance(adapter, DicomAdapter)
    assert adapter._calling_ae == "DICOMROUTER"
    own = build_adapter({**stored, "calling_ae": "EDGE1"}, BOX, calling_ae="DICOMROUTER",
                        policy=POLICY)
    assert isinstance(own, DicomAdapter) and own._calling_ae == "EDGE1"


def test_already_sealed_secrets_are_kept_but_only_for_their_destination() -> None:
    stored = seal_config(parse_destination(CLOUD), BOX)
    again = seal_config(parse_destination(stored), BOX)
    assert again["secret_access_key"] == stored["secret_access_key"]
    renamed = {**stored, "name": "cloud2"}
    with pytest.raises(DestinationConfigError, match="does not belong to this destination"):
        seal_config(parse_destination(renamed), BOX)
    with pytest.raises(DestinationConfigError, match="secret_access_key"):
        build_adapter(renamed, BOX, calling_ae="R", policy=POLICY)


def test_open_config_gives_plaintext_for_comparisons() -> None:
    stored = seal_config(parse_destination({**CLOUD, "session_token": "tok"}), BOX)
    opened = open_config(stored, BOX)
    assert opened["secret_access_key"] == CLOUD["secret_access_key"]
    assert opened["session_token"] == "tok"
    assert parse_destination(opened) == parse_destination({**CLOUD, "session_token": "tok"})


def test_a_stored_config_sealed_under_another_key_does_not_build() -> None:
    stored = seal_config(parse_destination(CLOUD), SecretBox(bytes(32)))
    with pytest.raises(DestinationConfigError, match="wrong master key"):
        build_adapter(stored, BOX, calling_ae="R", policy=POLICY)


def test_public_config_of_unknown_kinds_still_masks_sealed_values() -> None:
    shown = public_config({"name": "x", "type": "ai", "token": BOX.seal("t"), "url": "http://a"})
    assert shown == {"name": "x", "type": "ai", "token": MASK, "url": "http://a"}
