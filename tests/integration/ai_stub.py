"""An AI processor stub: a small aiohttp server on 127.0.0.1 that checks the router's request
signatures, records each request (JSON, and the DICOM files of a multipart body), answers with
a status the test chooses, and helps the test call back like a vendor would (signed JSON or
multipart with result objects).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pydicom
import requests
from aiohttp import web
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass
class Received:
    """One request as the stub saw it."""

    document: dict[str, Any]
    files: list[Dataset] = field(default_factory=list)
    signature_ok: bool = False


class AIStub:
    """Start with ``with AIStub(secret) as stub``; ``stub.url`` takes requests."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.requests: list[Received] = []
        self.pings = 0
        self.answer = 202
        self.headers: dict[str, str] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> AIStub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _start(self) -> None:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_post("/v1/studies", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1/studies"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get("X-Signature-Timestamp", "0")
        ok = hmac.compare_digest(request.headers.get("X-Signature", ""),
                                 sign(self.secret, int(timestamp), body))
        document, files = self._parse(request.headers.get("Content-Type", ""), body)
        if document.get("ping"):
            self.pings += 1
        else:
            self.requests.append(Received(document, files, ok))
        return web.Response(status=self.answer if ok else 401, headers=self.headers)

    @staticmethod
    def _parse(content_type: str, body: bytes) -> tuple[dict[str, Any], list[Dataset]]:
        if not content_type.startswith("multipart/related"):
            return json.loads(body), []
        boundary = content_type.split("boundary=", 1)[1].strip().encode()
        chunks = body.split(b"--" + boundary)[1:-1]
        parts = [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks]
        return json.loads(parts[0]), [pydicom.dcmread(io.BytesIO(p)) for p in parts[1:]]

    def wait(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the AI stub got {len(self.requests)} of {count} "
                                     "requests")
            time.sleep(0.05)
        return self.requests

    # -- calling back -------------------------------------------------------------------

    def callback(self, url: str, result: dict[str, Any], objects: list[Dataset] = (),
                 *, secret: str | None = None, timestamp: int | None = None,
                 signature: str | None = None, body: bytes | None = None) -> requests.Response:
        """POST a signed callback (JSON, or multipart with result objects)."""
        if body is None:
            content_type, body = _body(result, list(objects))
        else:
            content_type = "application/json"
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {"Content-Type": content_type, "X-Signature-Timestamp": str(ts),
                   "X-Signature": signature or sign(secret or self.secret, ts, body)}
        return requests.post(url, data=body, headers=headers, timeout=30)


def _body(result: dict[str, Any], objects: list[Dataset]) -> tuple[str, bytes]:
    if not objects:
        return "application/json", json.dumps(result).encode()
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    out.write(f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode())
    out.write(json.dumps(result).encode() + b"\r\n")
    for ds in objects:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(buffer.getvalue() + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/json"; boundary={boundary}', out.getvalue()


def make_sr(source: Dataset, text: str = "Nodule found") -> Dataset:
    """A Basic Text SR about ``source``'s study (patient and study copied as they were seen)."""
    ds = Dataset()
    ds.preamble = b"\0" * 128  # written as Part 10 by any writer (dicomweb-client too)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = text
    ds.ContentSequence = [item]
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    return ds
