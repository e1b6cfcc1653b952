"""One way to make a boto3 S3 client, for the blob store and S3 destinations alike.

boto3 is imported here, on first use: only processes with an S3 store or destination pay for
it (about 17 MB each).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


def s3_client(*, endpoint_url: str | None, region: str, access_key_id: str | None,
              secret_access_key: str | None, session_token: str | None = None,
              connect_timeout: float = 10, max_pool_connections: int = 10) -> S3Client:
    """A client whose settings come from our configuration only: no AWS_ENDPOINT_URL* from the
    environment, explicit checksums (no automatic CRC trailers, which older stores reject),
    path-style addressing for a custom endpoint, three tries."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=access_key_id or None,
        aws_secret_access_key=secret_access_key or None,
        aws_session_token=session_token or None,
        region_name=region,
    )
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": 60,
        "retries": {"mode": "standard", "max_attempts": 3},
        "s3": {"addressing_style": "path" if endpoint_url else "auto"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "ignore_configured_endpoint_urls": True,
        "tcp_keepalive": True,
        "max_pool_connections": max_pool_connections,
    }
    return session.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))
