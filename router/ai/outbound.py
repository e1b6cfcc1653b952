"""The body of an AI request: JSON naming the study and how to reach it, either with DICOMweb
references and a scoped token, or followed by the instances themselves (de-identified when the
destination asks) as a ``multipart/related`` body. Bodies are written to a spool file, so a
large study never sits in memory and can be signed before it is streamed.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.ai.deid import Mapping, deidentify
from router.ai.signing import signer

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Member:
    """One instance of the unit: its job, stored object and series."""

    job_id: str
    sha256: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass
class Body:
    """A spooled request body and its signature over ``"<timestamp>.<body>"``."""

    path: Path
    size: int
    content_type: str
    signature: str
    timestamp: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def describe(request_id: str, callback_url: str, study: str, members: list[Member],
             amendment: bool, dicomweb: dict[str, Any] | None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "correlation_id": request_id,
        "callback_url": callback_url,
        "study_instance_uid": study,
        "series_instance_uids": sorted({m.series_instance_uid for m in members}),
        "sop_instance_uids": [m.sop_instance_uid for m in members],
        "amendment": amendment,
    }
    if dicomweb is not None:
        document["dicomweb"] = dicomweb
    return document


def write_body(spool_dir: Path, secret: str, timestamp: int, document: dict[str, Any],
               files: list[Path] | None, seed: str | None, mapping: Mapping | None) -> Body:
    """Spool the body (JSON alone, or JSON then DICOM parts) while signing it."""
    mac = signer(secret)
    mac.update(f"{timestamp}.".encode())
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix="ai-", suffix=".body")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            def emit(data: bytes) -> None:
                nonlocal size
                mac.update(data)
                out.write(data)
                size += len(data)

            if files is None:
                emit(json.dumps(document).encode())
                content_type = "application/json"
            else:
                boundary = f"dicom-router-{uuid.uuid4().hex}"
                content_type = (f'multipart/related; type="application/json"; '
                                f"boundary={boundary}")
                _emit_parts(emit, boundary, document, files, seed, mapping)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Body(path, size, content_type, "sha256=" + mac.hexdigest(), timestamp)


def _emit_parts(emit: Callable[[bytes], None], boundary: str, document: dict[str, Any],
                files: list[Path], seed: str | None, mapping: Mapping | None) -> None:
    delimiter = f"--{boundary}\r\n".encode()
    emit(delimiter + b"Content-Type: application/json\r\n\r\n")
    emit(json.dumps(document).encode() + b"\r\n")
    for path in files:
        emit(delimiter + b"Content-Type: application/dicom\r\n\r\n")
        if seed is not None and mapping is not None:
            emit(deidentify(path, seed, mapping))
        else:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    emit(chunk)
        emit(b"\r\n")
    emit(f"--{boundary}--\r\n".encode())
