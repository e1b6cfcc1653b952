"""The master key and AES-256-GCM sealing of secret strings (passwords, S3 keys) at rest.

The master key comes from ``DICOM_ROUTER_SECRET_KEY`` or from ``<data_dir>/secret.key``; every
other key (sealing, the event-store cipher) is derived from it with HKDF-SHA256.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE_NAME = "secret.key"
SEALED_PREFIX = "enc:v1:"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_HEX_KEY = re.compile(r"^[0-9A-Fa-f]{64}$")
_HOW_TO_MAKE = 'generate one with: python -c "import secrets; print(secrets.token_hex(32))"'


class SecretError(ValueError):
    """A key is malformed or unsafe, or a sealed value cannot be opened."""


def parse_key_text(text: str, *, source: str = "DICOM_ROUTER_SECRET_KEY") -> bytes:
    """32 key bytes from 64 hex characters or base64 (standard or URL-safe, padding optional).

    The message of the error never repeats the value: it is a secret.
    """
    value = text.strip()
    if not value:
        raise SecretError(f"{source} is empty; {_HOW_TO_MAKE}")
    if _HEX_KEY.match(value):
        return bytes.fromhex(value)
    std = value.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    try:
        key = base64.b64decode(std, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(
            f"{source} must be 32 bytes written as 64 hex characters or as base64 "
            f"(got {len(value)} characters that are neither); {_HOW_TO_MAKE}"
        ) from None
    if len(key) != _KEY_BYTES:
        raise SecretError(
            f"{source} must be 32 bytes written as 64 hex characters or as base64 "
            f"(44 characters); this value has {len(value)} characters and decodes as "
            f"base64 to {len(key)} bytes; {_HOW_TO_MAKE}"
        )
    return key


def load_master_key(secret_key: str | None, data_dir: Path) -> bytes:
    """The 32-byte master key: from ``secret_key`` if given, else ``data_dir/secret.key``.

    A missing key file is created (mode 0600, 32 random bytes written as base64 text so an
    administrator can copy it to ``DICOM_ROUTER_SECRET_KEY`` on other nodes).
    """
    if secret_key is not None:
        return parse_key_text(secret_key)
    path = Path(data_dir) / KEY_FILE_NAME
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    try:
        return _create_key_file(path)
    except FileExistsError:
        # Another process created it between our read and our create: use theirs.
        return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"{path} is readable or writable by group/others (mode "
                f"{stat.S_IMODE(mode):04o}); refusing to use it: run 'chmod 600 {path}'"
            )
        data = f.read(1024)
    if len(data) == _KEY_BYTES:
        return data
    try:
        return parse_key_text(data.decode("ascii"), source=str(path))
    except UnicodeDecodeError:
        raise SecretError(
            f"{path} is not a key file (expected 32 raw bytes, 64 hex characters or base64)"
        ) from None


def _create_key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(_KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.urlsafe_b64encode(key) + b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    _fsync_dir(path.parent)
    return key


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SecretBox:
    """Seals and opens secret strings with AES-256-GCM under a key derived from the master key.

    ``context`` (e.g. ``"pacs:secret_access_key"``) is bound as associated data, so a sealed
    value copied to another field or destination does not open.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise SecretError("the master key must be exactly 32 bytes")
        self._master = key
        self._aead = AESGCM(self.derive("sealed-secrets"))

    def derive(self, purpose: str) -> bytes:
        """A 32-byte subkey for ``purpose`` (HKDF-SHA256); same key and purpose, same subkey."""
        if not purpose:
            raise SecretError("a key purpose is required")
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=_KEY_BYTES,
            salt=None,
            info=b"dicom-router/v1/" + purpose.encode("utf-8"),
        )
        return hkdf.derive(self._master)

    def seal(self, plaintext: str, *, context: str = "") -> str:
        """``"enc:v1:" + base64(nonce | ciphertext | tag)``; a fresh random nonce each time."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, *, context: str = "") -> str:
        """The plaintext of ``sealed``; :class:`SecretError` if tampered, wrong key or context."""
        if not self.is_sealed(sealed):
            raise SecretError(f"not a sealed value (expected the prefix {SEALED_PREFIX!r})")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :].encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise SecretError("sealed value is not valid base64") from None
        if len(raw) < _NONCE_BYTES + 16:
            raise SecretError("sealed value is too short")
        try:
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise SecretError(
                "cannot open sealed value: wrong master key, wrong context or tampered data"
            ) from None
        return plain.decode("utf-8")

    @staticmethod
    def is_sealed(value: object) -> bool:
        """True for strings produced by :meth:`seal` (checked by prefix only)."""
        return isinstance(value, str) and value.startswith(SEALED_PREFIX)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"
