"""Destination kind ``s3``: upload each instance to an S3 or S3-compatible bucket (MinIO...).

Uploads carry SHA-256 checksums the server verifies, the blob's SHA-256 as object metadata, and
are read back (HeadObject) before success is reported. Every connection boto3 opens goes to an
address the address policy checked (router.dispatch.ssrf), resolved by us, not by urllib3.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import re
import socket
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from router.config_types import (
    STRICT,
    Concurrency,
    Description,
    DestinationName,
    Doc,
    StrictBool,
    StrictInt,
    TransformNames,
)
from router.dispatch.base import (
    Outgoing,
    PermanentDeliveryError,
    RefusedAddressError,
    TransientDeliveryError,
    UnreachableError,
)
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError, NameNotResolvedError
from router.dispatch.templates import PathTemplate, TemplateError
from router.storage.s3_client import s3_client

if TYPE_CHECKING:
    from botocore.exceptions import ClientError
    from mypy_boto3_s3.client import S3Client

logger = logging.getLogger(__name__)

DEFAULT_S3_TEMPLATE = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "GLACIER_IR",
        "DEEP_ARCHIVE",
        "EXPRESS_ONEZONE",
    }
)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9-]{1,32}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._/-]*$")
_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "ExpiredToken",
        "InvalidToken",
        "InvalidStorageClass",
        "BadDigest",
        "EntityTooLarge",
        "403",
        "404",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
    }
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3DestinationConfig:
    """A bucket (and key prefix) on AWS S3 or an S3-compatible endpoint."""

    __pydantic_config__ = STRICT

    name: DestinationName
    bucket: str
    access_key_id: str
    secret_access_key: Annotated[str, Doc("write-only: never shown again")]
    session_token: Annotated[str | None, Doc("optional; write-only")] = None
    prefix: Annotated[str, Doc("key prefix, e.g. site-a/")] = ""
    endpoint_url: Annotated[str | None, Doc(
        "MinIO or another S3-compatible store; empty for AWS")] = None
    region: Annotated[str, Doc("e.g. us-east-1")] = "us-east-1"
    template: Annotated[str, Doc("object keys below the prefix, e.g. "
                                 "{StudyInstanceUID}/{SOPInstanceUID}.dcm")] = (
        DEFAULT_S3_TEMPLATE)
    storage_class: Annotated[str | None, Doc("empty: the bucket's default")] = None
    multipart_threshold: Annotated[StrictInt, Doc(
        "bytes; larger objects upload in parts")] = 16 * MIB
    concurrency: Concurrency = 4
    enabled: StrictBool = True
    description: Description = ""
    transforms: TransformNames = ()  # router.transforms, applied to each copy sent

    def problems(self) -> dict[str, str]:
        """Field -> message for values that are well-typed but unusable."""
        problems: dict[str, str] = {}
        if not _BUCKET.match(self.bucket) or ".." in self.bucket:
            problems["bucket"] = "must be a valid bucket name (3-63 of a-z 0-9 . -)"
        if not _PREFIX.match(self.prefix) or len(self.prefix) > 256:
            problems["prefix"] = "may only use letters, digits and . _ - / (max 256)"
        elif self.prefix.startswith("/") or "//" in self.prefix:
            problems["prefix"] = "must not start with '/' or contain '//'"
        elif any(part in (".", "..") for part in self.prefix.split("/")):
            problems["prefix"] = "must not contain '.' or '..' components"
        if self.endpoint_url is not None and (msg := _url_problem(self.endpoint_url)):
            problems["endpoint_url"] = msg
        if not _REGION.match(self.region):
            problems["region"] = "must look like us-east-1"
        for key in ("access_key_id", "secret_access_key"):
            if not getattr(self, key).strip():
                problems[key] = "must not be empty"
        if self.storage_class is not None and self.storage_class not in STORAGE_CLASSES:
            problems["storage_class"] = "must be one of " + ", ".join(sorted(STORAGE_CLASSES))
        if not MIN_PART_SIZE <= self.multipart_threshold <= 5 * 1024 * MIB:
            problems["multipart_threshold"] = "must be between 5 MiB and 5 GiB (in bytes)"
        try:
            PathTemplate.parse(self.template)
        except TemplateError as exc:
            problems["template"] = str(exc)
        return problems


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password or parts.query or parts.fragment:
        return "must not contain credentials, a query or a fragment"
    return None


class _PinnedConnection:
    """urllib3's connection with its socket made by the address policy (mixed in front of
    botocore's connection classes): the name is resolved and every address checked right
    before connecting, and the connection goes to a checked address."""

    address_policy: AddressPolicy

    def _new_conn(self) -> socket.socket:
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

        conn: Any = self
        timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
        try:
            return self.address_policy.connect(conn._dns_host, conn.port, timeout,
                                               conn.socket_options or ())
        except AddressRefusedError:
            raise  # not an OSError: urllib3 passes it on, botocore wraps it (HTTPClientError)
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
        except NameNotResolvedError as exc:
            raise NameResolutionError(conn.host, conn, socket.gaierror(str(exc))) from exc
        except OSError as exc:
            raise NewConnectionError(conn, f"failed to establish a connection: {exc}") from exc


def _pin_connections(client: Any, policy: AddressPolicy) -> None:
    """Route every pool of this client (proxied ones included) through the policy.

    botocore has no public hook for the socket; it builds its pools from the classes of its
    HTTP session's ``_pool_classes_by_scheme``, which this replaces for this client only.
    """
    pools = client._endpoint.http_session._pool_classes_by_scheme
    for scheme, pool in list(pools.items()):
        connection = type(f"Pinned{pool.ConnectionCls.__name__}",
                          (_PinnedConnection, pool.ConnectionCls), {"address_policy": policy})
        pools[scheme] = type(f"Pinned{pool.__name__}", (pool,), {"ConnectionCls": connection})


class S3Adapter:
    """Uploads instances with boto3; used by one worker thread at a time."""

    def __init__(self, config: S3DestinationConfig, *, policy: AddressPolicy) -> None:
        # Deferred: only processes with an S3 destination pay for boto3 (about 17 MB each).
        from botocore.exceptions import BotoCoreError, ClientError

        self._config = config
        self._boto_errors: tuple[type[Exception], ...] = (ClientError, BotoCoreError)
        self._client_error: type[ClientError] = ClientError
        self._template = PathTemplate.parse(config.template)
        self._client: S3Client = s3_client(
            endpoint_url=config.endpoint_url, region=config.region,
            access_key_id=config.access_key_id, secret_access_key=config.secret_access_key,
            session_token=config.session_token)
        self._policy = policy
        _pin_connections(self._client, policy)

    def send(self, item: Outgoing) -> str:
        """Upload ``item`` (single PUT or multipart), then verify size and SHA-256 metadata."""
        try:
            key = self._config.prefix + self._template.render(item.header)
        except TemplateError as exc:
            raise PermanentDeliveryError(f"s3 destination template: {exc}") from None
        try:
            if item.size < self._config.multipart_threshold:
                expected, parts = self._put_single(key, item), 1
            else:
                expected, parts = self._put_multipart(key, item)
            self._verify(key, item, expected)
        except self._boto_errors as exc:
            raise self._error(exc) from None
        except OSError as exc:
            raise TransientDeliveryError(
                f"cannot read the stored blob: {type(exc).__name__} errno {exc.errno}"
            ) from None
        return f"uploaded {item.size} bytes to bucket {self._config.bucket} in {parts} part(s)"

    def check(self) -> str:
        """HeadBucket: the endpoint answers and the credentials may use the bucket."""
        parts = urlsplit(self._client.meta.endpoint_url)
        try:  # first, so that a refused endpoint is not tried (and retried) by botocore
            self._policy.resolve(parts.hostname or "",
                                 parts.port or (443 if parts.scheme == "https" else 80))
        except AddressRefusedError as exc:
            raise RefusedAddressError(f"S3 endpoint: {exc}") from None
        except OSError as exc:
            raise UnreachableError(f"S3 endpoint {self._where()} unreachable: {exc}") from None
        try:
            self._client.head_bucket(Bucket=self._config.bucket)
        except self._boto_errors as exc:
            raise self._error(exc) from None
        return f"bucket {self._config.bucket} reachable"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _extra(self, item: Outgoing) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "ContentType": "application/dicom",
            "Metadata": {"sha256": item.sha256},
        }
        if self._config.storage_class:
            extra["StorageClass"] = self._config.storage_class
        return extra

    def _put_single(self, key: str, item: Outgoing) -> str:
        """PutObject with the blob's SHA-256 as checksum: the server rejects other bytes.

        The blob is hashed here first as well: not every S3-compatible store verifies.
        """
        with item.path.open("rb") as body:
            if hashlib.file_digest(body, "sha256").hexdigest() != item.sha256:
                raise PermanentDeliveryError("stored blob does not match its recorded SHA-256")
            body.seek(0)
            checksum = base64.b64encode(bytes.fromhex(item.sha256)).decode("ascii")
            self._client.put_object(
                Bucket=self._config.bucket,
                Key=key,
                Body=body,
                ContentLength=item.size,
                ChecksumSHA256=checksum,
                **self._extra(item),
            )
        return checksum

    def _put_multipart(self, key: str, item: Outgoing) -> tuple[str, int]:
        """Multipart upload with a SHA-256 per part; aborted on any failure."""
        bucket = self._config.bucket
        upload = self._client.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **self._extra(item)
        )
        upload_id = upload["UploadId"]
        try:
            parts, digests = self._upload_parts(key, upload_id, item)
            self._client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            with contextlib.suppress(*self._boto_errors):
                self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
        return f"{composite}-{len(parts)}", len(parts)

    def _upload_parts(
        self, key: str, upload_id: str, item: Outgoing
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        part_size = max(self._config.multipart_threshold, -(-item.size // MAX_PARTS))
        whole = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []
        with item.path.open("rb") as src:
            while chunk := src.read(part_size):
                whole.update(chunk)
                digest = hashlib.sha256(chunk).digest()
                checksum = base64.b64encode(digest).decode("ascii")
                number = len(parts) + 1
                answer = self._client.upload_part(
                    Bucket=self._config.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ChecksumSHA256=checksum,
                )
                parts.append(
                    {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}
                )
                digests.append(digest)
        if whole.hexdigest() != item.sha256:
            raise PermanentDeliveryError("stored blob does not match its recorded SHA-256")
        return parts, digests

    def _verify(self, key: str, item: Outgoing, expected_checksum: str) -> None:
        head = self._client.head_object(Bucket=self._config.bucket, Key=key, ChecksumMode="ENABLED")
        problems = []
        if head.get("ContentLength") != item.size:
            problems.append("size")
        if head.get("Metadata", {}).get("sha256") != item.sha256:
            problems.append("sha256 metadata")
        returned = head.get("ChecksumSHA256")
        # Multipart: AWS answers "<composite>-<parts>"; some emulators omit the suffix.
        if returned and returned.split("-")[0] != expected_checksum.split("-")[0]:
            problems.append("checksum")
        if problems:
            raise TransientDeliveryError(
                f"integrity check after upload to bucket {self._config.bucket} failed: "
                + ", ".join(problems)
                + " differ"
            )

    def _error(self, exc: Exception) -> PermanentDeliveryError | TransientDeliveryError:
        """Classify a boto error; the message names the bucket and code, never the key."""
        bucket = self._config.bucket
        if isinstance(exc, self._client_error):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            operation = exc.operation_name
            message = f"S3 {operation} on bucket {bucket} failed: {code} (HTTP {status})"
            permanent = code in _PERMANENT_CODES or (
                code not in _TRANSIENT_CODES and 400 <= status < 500 and status not in (408, 429)
            )
        else:
            cause = getattr(exc, "kwargs", {}).get("error")
            if isinstance(cause, AddressRefusedError):
                message = f"S3 endpoint: {cause}"
                logger.warning("s3 destination %s: %s", self._config.name, message)
                return RefusedAddressError(message)
            message = f"S3 endpoint {self._where()} unreachable or failed: {type(exc).__name__}"
            logger.warning("s3 destination %s: %s", self._config.name, message)
            # No S3 answer at all: the test button words it like any unreachable address.
            return UnreachableError(message)
        logger.warning("s3 destination %s: %s", self._config.name, message)
        if permanent:
            return PermanentDeliveryError(message)
        return TransientDeliveryError(message)

    def _where(self) -> str:
        return self._config.endpoint_url or f"AWS region {self._config.region}"
