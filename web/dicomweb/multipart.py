"""Streamed ``multipart/related`` responses (RFC 2387): parts are written as they are produced,
so a whole study never sits in memory; a file part is copied from disk in chunks.

Each part header is spelled ``Content-Type:`` (OHIF's frame parser looks for that spelling).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aiohttp import web

CHUNK = 1 << 20


class ClientGone(Exception):
    """The client closed the connection while a response was being streamed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client closed the connection")
        self.response = response


class MultipartWriter:
    """Writes one multipart/related response; ``part_type`` is its ``type`` parameter."""

    def __init__(self, request: web.Request, part_type: str) -> None:
        self._request = request
        self.boundary = uuid.uuid4().hex
        self.parts = 0
        self.response = web.StreamResponse(headers={
            "Content-Type": f'multipart/related; type="{part_type}"; boundary={self.boundary}',
        })
        self.response.enable_chunked_encoding()

    async def _write(self, data: bytes) -> None:
        try:
            if not self.response.prepared:
                await self.response.prepare(self._request)
            await self.response.write(data)
        except ConnectionResetError:
            raise ClientGone(self.response) from None

    def _head(self, content_type: str, length: int | None) -> bytes:
        lead = b"--" if self.parts == 0 else b"\r\n--"
        self.parts += 1
        lines = [f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return lead + self.boundary.encode() + b"\r\n" + "\r\n".join(lines).encode() + b"\r\n\r\n"

    async def add_bytes(self, content_type: str, data: bytes) -> None:
        await self._write(self._head(content_type, len(data)) + data)

    async def add_file(self, content_type: str, path: Path, offset: int = 0,
                       length: int | None = None) -> None:
        """A part copied from ``path`` (``length`` bytes from ``offset``, default: to the end)."""
        size = path.stat().st_size - offset if length is None else length
        await self._write(self._head(content_type, size))
        with path.open("rb") as fp:
            fp.seek(offset)
            remaining = size
            while remaining > 0:
                chunk = await asyncio.to_thread(fp.read, min(CHUNK, remaining))
                if not chunk:
                    raise OSError("stored object is shorter than expected")
                remaining -= len(chunk)
                await self._write(chunk)

    async def finish(self) -> web.StreamResponse:
        """The closing delimiter (an empty multipart when no part was added)."""
        lead = b"--" if self.parts == 0 else b"\r\n--"
        await self._write(lead + self.boundary.encode() + b"--\r\n")
        try:
            await self.response.write_eof()
        except ConnectionResetError:
            raise ClientGone(self.response) from None
        return self.response
