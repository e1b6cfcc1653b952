"""What an S3 blob store's settings must look like ([storage] backend = "s3").

The checks are those of the s3 destination (router/dispatch/s3.py), so a bucket, prefix or
endpoint accepted for one is accepted for the other.
"""

from __future__ import annotations

from typing import Any

from router.dispatch.s3 import _BUCKET, _PREFIX, _REGION, _url_problem


def s3_store_problems(storage: Any) -> dict[str, str]:
    """Field -> message for a [storage] table with backend = "s3" (empty when usable)."""
    problems: dict[str, str] = {}
    if not storage.bucket:
        problems["bucket"] = 'required when backend = "s3"'
    elif not _BUCKET.match(storage.bucket) or ".." in storage.bucket:
        problems["bucket"] = "must be a valid bucket name (3-63 of a-z 0-9 . -)"
    prefix = storage.prefix
    if not _PREFIX.match(prefix) or len(prefix) > 256:
        problems["prefix"] = "may only use letters, digits and . _ - / (max 256)"
    elif prefix.startswith("/") or "//" in prefix:
        problems["prefix"] = "must not start with '/' or contain '//'"
    elif any(part in (".", "..") for part in prefix.split("/")):
        problems["prefix"] = "must not contain '.' or '..' components"
    if storage.endpoint_url and (message := _url_problem(storage.endpoint_url)):
        problems["endpoint_url"] = message
    if not _REGION.match(storage.region):
        problems["region"] = "must look like us-east-1"
    if bool(storage.access_key_id) != bool(storage.secret_access_key):
        key = "secret_access_key" if storage.access_key_id else "access_key_id"
        problems[key] = "set both access_key_id and secret_access_key, or neither"
    return problems


def object_prefix(prefix: str) -> str:
    """The validated prefix as the start of a key: empty, or ending with one '/'."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"
