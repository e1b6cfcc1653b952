"""Streaming reader of multipart/related request bodies (STOW-RS uploads).

Parts are counted and their headers checked before any of them is written to disk: the first
``SCAN_BYTES`` of parts are held in memory, and spooled only once the whole body has been read
and found acceptable. A body of many small parts (the cheap way to make a server create
thousands of files) is thus refused without a file. A bigger body spills to disk: the parts
held so far are spooled and the rest streams, each part into its own spool file as it arrives
(hashed while written, like a C-STORE), still checked before its file exists, so memory stays
bounded whatever the size of the upload.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from router.dicom.spool import SpoolFile

MAX_HEADER_BYTES = 16 * 1024  # all header lines of one part
MAX_PREAMBLE_BYTES = 64 * 1024  # text before the first boundary (RFC 2046 allows some)
FLUSH_BYTES = 1 << 20  # write to the spool file in pieces of about this size
# Parts held in memory (and checked) before the first is spooled: 10,000 parts of 800 bytes.
SCAN_BYTES = 8 << 20
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Unquoted values are read leniently: senders write type=application/dicom without quotes.
_PARAM = re.compile(rf'\s*;\s*({_TCHARS})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)')


class MultipartError(ValueError):
    """The body is not well-formed multipart (answered 400); the message has no PHI."""


class BodyTooLargeError(MultipartError):
    """The body exceeds the size or part-count limit (answered 413)."""


class SpoolWriteError(OSError):
    """A part could not be written to the spool (disk full, I/O error: answered 503)."""


class Reader(Protocol):
    """What is read from: aiohttp's ``request.content`` (a StreamReader)."""

    async def readany(self) -> bytes: ...


@dataclass
class Part:
    """One body part: its headers (lower-case names) and the finished spool file."""

    headers: dict[str, str]
    path: Path
    sha256: str
    size: int
    spool: SpoolFile = field(repr=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case, quotes removed).

    Raises MultipartError when the value is not a media type.
    """
    head, _, rest = value.partition(";")
    media = head.strip().lower()
    if not re.fullmatch(rf"{_TCHARS}/{_TCHARS}", media):
        raise MultipartError("Content-Type is not a media type")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    position = 0
    while position < len(rest.rstrip()):
        found = _PARAM.match(rest, position)
        if found is None:
            raise MultipartError("Content-Type has malformed parameters")
        name, raw = found.group(1).lower(), found.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name] = raw
        position = found.end()
    return media, params


def check_boundary(boundary: str) -> bytes:
    """The boundary as bytes; MultipartError if RFC 2046 does not allow it."""
    if not _BOUNDARY.match(boundary):
        raise MultipartError("multipart boundary is missing or not allowed by RFC 2046")
    return boundary.encode("ascii")


class _Body:
    """A buffer over the request stream that counts what it reads against a limit."""

    def __init__(self, stream: Reader, max_bytes: int) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self.received = 0
        # A CRLF in front lets the first boundary be found like every other delimiter.
        self.buf = bytearray(b"\r\n")

    async def fill(self) -> bool:
        """Append what the client sent next; False at the end of the body."""
        data = await self._stream.readany()
        if not data:
            return False
        self.received += len(data)
        if self.received > self._max_bytes:
            raise BodyTooLargeError(f"request body exceeds {self._max_bytes} bytes")
        self.buf += data
        return True

    async def need(self, count: int, what: str) -> None:
        while len(self.buf) < count:
            if not await self.fill():
                raise MultipartError(f"body ends {what}")

    async def until(self, marker: bytes, limit: int, what: str) -> bytes:
        """Bytes before ``marker`` (which is consumed), reading at most ``limit`` bytes."""
        searched = 0
        while (index := self.buf.find(marker, searched)) < 0:
            if len(self.buf) > limit:
                raise MultipartError(f"{what} too long")
            searched = max(0, len(self.buf) - len(marker) + 1)
            if not await self.fill():
                raise MultipartError(f"body ends in the {what}")
        data = bytes(self.buf[:index])
        del self.buf[:index + len(marker)]
        return data

    async def take_until(self, marker: bytes, limit: int) -> tuple[bytes, bool]:
        """(bytes before ``marker``, True), the marker consumed; or, once more than ``limit``
        bytes came without it, (those bytes, False): the part goes on."""
        searched = 0
        keep = len(marker) - 1  # a marker may straddle two reads
        while (index := self.buf.find(marker, searched)) < 0:
            if len(self.buf) - keep > limit:
                cut = len(self.buf) - keep
                data = bytes(self.buf[:cut])
                del self.buf[:cut]
                return data, False
            searched = max(0, len(self.buf) - keep)
            if not await self.fill():
                raise MultipartError("body ends inside a part (no closing boundary)")
        data = bytes(self.buf[:index])
        del self.buf[:index + len(marker)]
        return data, True

    async def copy_until(self, marker: bytes,
                         write: Callable[[bytes], Awaitable[None]]) -> None:
        """Stream everything before ``marker`` to ``write``; the marker is consumed."""
        searched = 0
        keep = len(marker) - 1  # a marker may straddle two reads
        while (index := self.buf.find(marker, searched)) < 0:
            if len(self.buf) - keep >= FLUSH_BYTES:
                cut = len(self.buf) - keep
                await write(bytes(self.buf[:cut]))
                del self.buf[:cut]
            searched = max(0, len(self.buf) - keep)
            if not await self.fill():
                raise MultipartError("body ends inside a part (no closing boundary)")
        if index:
            await write(bytes(self.buf[:index]))
        del self.buf[:index + len(marker)]


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not re.fullmatch(_TCHARS, name):
            raise MultipartError("malformed part header")
        headers[name.lower()] = value.strip()
    return headers


async def _after_delimiter(body: _Body) -> bool:
    """After a boundary: True if another part follows, False after the closing one."""
    await body.need(2, "after a boundary")
    if body.buf[:2] == b"--":
        return False
    padding = await body.until(b"\r\n", 1024, "boundary line")
    if padding.strip(b" \t"):  # only transport padding may follow a boundary (RFC 2046)
        raise MultipartError("text after a boundary")
    return True


async def _read_headers(body: _Body) -> dict[str, str]:
    await body.need(2, "in part headers")
    if body.buf[:2] == b"\r\n":  # a part without headers
        del body.buf[:2]
        return {}
    return _parse_headers(await body.until(b"\r\n\r\n", MAX_HEADER_BYTES, "part headers"))


async def _spool(headers: dict[str, str], spool_dir: Path, first: bytes,
                 rest: tuple[_Body, bytes] | None = None) -> Part:
    """A finished spool file holding ``first``, then (with ``rest``) the body's bytes up to
    the delimiter."""
    spool = await asyncio.to_thread(SpoolFile, spool_dir)

    async def write(data: bytes) -> None:
        await asyncio.to_thread(spool.write, data)
        if spool.error is not None:
            raise SpoolWriteError(spool.error.errno, spool.error.strerror)

    try:
        if first:
            await write(first)
        if rest is not None:
            await rest[0].copy_until(rest[1], write)
        sha256 = await asyncio.to_thread(_finish, spool)
    except BaseException:
        await asyncio.to_thread(_discard, spool)
        raise
    return Part(headers, spool.path, sha256, spool.size, spool)


async def spool_stream(headers: dict[str, str], spool_dir: Path,
                       read: Callable[[], Awaitable[bytes]]) -> Part:
    """A finished spool file of what ``read()`` returns until it returns nothing (a file
    field of a browser's form upload); SpoolWriteError when the disk refuses it."""
    spool = await asyncio.to_thread(SpoolFile, spool_dir)
    try:
        while data := await read():
            await asyncio.to_thread(spool.write, data)
            if spool.error is not None:
                raise SpoolWriteError(spool.error.errno, spool.error.strerror)
        sha256 = await asyncio.to_thread(_finish, spool)
    except BaseException:
        await asyncio.to_thread(_discard, spool)
        raise
    return Part(headers, spool.path, sha256, spool.size, spool)


def _finish(spool: SpoolFile) -> str:
    try:
        sha256 = spool.finish()
    except OSError as exc:
        raise SpoolWriteError(exc.errno, exc.strerror) from None
    finally:
        spool.close()  # waits for the fsync: one open descriptor per request at a time
    return sha256


def _discard(spool: SpoolFile) -> None:
    spool.close()
    spool.path.unlink(missing_ok=True)


def discard(parts: list[Part]) -> None:
    """Delete the spool files of parts that will not be stored."""
    for part in parts:
        part.path.unlink(missing_ok=True)


HeaderCheck = Callable[[int, Mapping[str, str]], None]


async def read_parts(stream: Reader, boundary: str, spool_dir: Path, *, max_bytes: int,
                     max_parts: int, check: HeaderCheck | None = None) -> list[Part]:
    """Read a whole multipart body, each part into a finished spool file.

    Every part is counted, and ``check(number, headers)`` (numbers from 1; it raises
    MultipartError to refuse the body) called, before the part's file exists; while the parts
    fit in ``SCAN_BYTES`` none is spooled before the whole body is read.

    Raises MultipartError (malformed, refused by ``check``, or no part at all),
    BodyTooLargeError or SpoolWriteError; then, and on cancellation, no spool file is left
    behind.
    """
    delimiter = b"\r\n--" + check_boundary(boundary)
    body = _Body(stream, max_bytes)
    held: list[tuple[dict[str, str], bytes]] = []  # checked, in memory, not spooled yet
    held_bytes = 0
    parts: list[Part] = []
    try:
        await body.until(delimiter, MAX_PREAMBLE_BYTES, "preamble")
        while await _after_delimiter(body):
            number = len(held) + len(parts) + 1
            if number > max_parts:
                raise BodyTooLargeError(f"more than {max_parts} parts")
            headers = await _read_headers(body)
            if check is not None:
                check(number, headers)
            if parts:  # spilled already: this part streams to disk
                parts.append(await _spool(headers, spool_dir, b"", (body, delimiter)))
                continue
            data, whole = await body.take_until(delimiter, SCAN_BYTES - held_bytes)
            if whole:
                held.append((headers, data))
                held_bytes += len(data)
                continue
            # Too big to hold: spool what is held, then stream this part and the rest.
            for held_headers, held_data in held:
                parts.append(await _spool(held_headers, spool_dir, held_data))
            held = []
            parts.append(await _spool(headers, spool_dir, data, (body, delimiter)))
        for held_headers, held_data in held:
            parts.append(await _spool(held_headers, spool_dir, held_data))
    except BaseException:
        await asyncio.to_thread(discard, parts)
        raise
    if not parts:
        raise MultipartError("multipart body has no parts")
    return parts
