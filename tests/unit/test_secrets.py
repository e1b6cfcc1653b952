"""Master key loading and AES-256-GCM sealing of secret strings."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from router.secrets import KEY_FILE_NAME, SecretBox, SecretError, load_master_key

KEY = bytes(range(32))


def test_sealed_values_round_trip_and_differ_each_time() -> None:
    box = SecretBox(KEY)
    first = box.seal("s3cr3t", context="pacs:password")
    second = box.seal("s3cr3t", context="pacs:password")
    assert first != second and "s3cr3t" not in first
    assert first.startswith("enc:v1:")
    assert box.open(first, context="pacs:password") == "s3cr3t"
    assert box.open(box.seal("ünïcode ✓")) == "ünïcode ✓"


def test_a_sealed_value_does_not_open_in_another_context() -> None:
    box = SecretBox(KEY)
    sealed = box.seal("s3cr3t", context="cloud:secret_access_key")
    with pytest.raises(SecretError, match="wrong context"):
        box.open(sealed, context="other:secret_access_key")


def test_tampered_values_are_refused() -> None:
    box = SecretBox(KEY)
    sealed = box.seal("s3cr3t")
    raw = bytearray(base64.urlsafe_b64decode(sealed[len("enc:v1:") :]))
    raw[-1] ^= 0x01
    tampered = "enc:v1:" + base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(SecretError, match="tampered"):
        box.open(tampered)
    with pytest.raises(SecretError, match="too short"):
        box.open("enc:v1:AAAA")
    with pytest.raises(SecretError, match="base64"):
        box.open("enc:v1:not base64!")


def test_a_wrong_key_cannot_open() -> None:
    sealed = SecretBox(KEY).seal("s3cr3t")
    with pytest.raises(SecretError, match="wrong master key"):
        SecretBox(bytes(32)).open(sealed)


def test_plaintext_is_not_taken_for_a_sealed_value() -> None:
    box = SecretBox(KEY)
    assert SecretBox.is_sealed(box.seal("x"))
    assert not SecretBox.is_sealed("x") and not SecretBox.is_sealed(None)
    with pytest.raises(SecretError, match="not a sealed value"):
        box.open("plain")


def test_keys_must_be_32_bytes() -> None:
    with pytest.raises(SecretError, match="32 bytes"):
        SecretBox(b"short")


def test_derived_keys_are_stable_and_separate_per_purpose() -> None:
    box = SecretBox(KEY)
    assert box.derive("event-store") == SecretBox(KEY).derive("event-store")
    assert box.derive("event-store") != box.derive("sessions")
    assert len(box.derive("event-store")) == 32
    assert box.derive("event-store") != KEY
    assert "00010203" not in repr(box)


@pytest.mark.parametrize(
    "text",
    [
        KEY.hex(),
        KEY.hex().upper(),
        base64.b64encode(KEY).decode(),
        base64.urlsafe_b64encode(KEY).decode().rstrip("="),
        f"  {base64.b64encode(KEY).decode()}\n",
    ],
)
def test_environment_keys_in_hex_or_base64(text: str, tmp_path: Path) -> None:
    assert load_master_key(text, tmp_path) == KEY
    assert not (tmp_path / KEY_FILE_NAME).exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("abc def!", "neither"),
        ("abcdef", "to 4 bytes"),
        ("zz" * 32, "64 characters and decodes as base64 to 48 bytes"),
        (base64.b64encode(bytes(31)).decode(), "to 31 bytes"),
        (base64.b64encode(bytes(64)).decode(), "to 64 bytes"),
        ("ab" * 31, "to 46 bytes"),
    ],
)
def test_bad_environment_keys_explain_the_format(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=message) as caught:
        load_master_key(text, tmp_path)
    assert "DICOM_ROUTER_SECRET_KEY" in str(caught.value)
    assert "token_hex(32)" in str(caught.value)
    if text:
        assert text not in str(caught.value)  # the key is never echoed


def test_key_file_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    key = load_master_key(None, data_dir)
    path = data_dir / KEY_FILE_NAME
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key(None, data_dir) == key
    # The file is base64 text, so it can be copied into DICOM_ROUTER_SECRET_KEY.
    assert load_master_key(path.read_text(), tmp_path) == key


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_master_key(None, tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(SecretError, match=r"group/others.*0644.*chmod 600"):
        load_master_key(None, tmp_path)


def test_raw_and_corrupt_key_files(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, KEY)
    os.close(fd)
    assert load_master_key(None, tmp_path) == KEY
    path.write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(SecretError, match="not a key file"):
        load_master_key(None, tmp_path)
    path.write_text("too short\n")
    with pytest.raises(SecretError, match=str(path)):
        load_master_key(None, tmp_path)
