"""WADO-RS pixel resources of one instance: frames (1-based lists, always multipart, each part
``Content-Type: <type>; transfer-syntax=<uid>``), bulk data (the BulkDataURIs of metadata),
rendered frames and thumbnails (also of a series or study: a representative instance).

A frame is sent as stored when the Accept header allows it (compressed frames from their
fragments), else decompressed to Explicit VR Little Endian when possible, else 406.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.uid import UID

from web.api.common import ApiError
from web.dicomweb import accept
from web.dicomweb.access import AccessNote, Handler, audited
from web.dicomweb.lookup import InstanceRow, blob_path, find_instances, one_instance
from web.dicomweb.multipart import MultipartWriter
from web.dicomweb.rendered import parse_options, render
from web.dicomweb.stored import (
    PIXEL_TAGS,
    DecodeError,
    StoredInstance,
    decodable,
    frame_bytes,
    frame_length,
    full_dataset,
    little_endian,
    open_instance,
)
from web.keys import ROUTER_KEY

MAX_FRAMES = 2000  # numbers in one frame list
_FRAMES = re.compile(r"^[0-9]{1,7}(,[0-9]{1,7})*$")
BULK_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/[0-9]{1,6}/[0-9A-Fa-f]{8}){0,8}$")


def not_acceptable(exc: DecodeError) -> ApiError:
    return ApiError(406, f"{exc}; ask for the stored transfer syntax (transfer-syntax=*)")


def frame_numbers(request: web.Request, inst: StoredInstance) -> list[int]:
    text = request.match_info["frames"].replace(" ", "")
    if not _FRAMES.match(text):
        raise ApiError(400, "frames must be a comma-separated list of frame numbers (from 1)")
    numbers = [int(n) for n in text.split(",")]
    if len(numbers) > MAX_FRAMES or 0 in numbers:
        raise ApiError(400, f"frame numbers start at 1; at most {MAX_FRAMES} per request")
    if inst.pixels is None:
        raise ApiError(404, "this instance has no pixel data, hence no frames")
    beyond = [n for n in numbers if n > inst.frames]
    if beyond:
        raise ApiError(404, f"frame {beyond[0]} does not exist: the instance has"
                            f" {inst.frames} frame(s)")
    return numbers


async def _opened(request: web.Request, note: AccessNote) -> StoredInstance:
    _, path = await one_instance(request, note)
    return await asyncio.to_thread(open_instance, path)


def _frame_choice(request: web.Request, inst: StoredInstance) -> tuple[str, str]:
    choices = accept.accepted(request.headers.get("Accept"), accept.frame_choices)
    ts = str(inst.transfer_syntax)
    choice = accept.frame_choice(choices, ts, decodable(ts))
    if choice is None:
        raise ApiError(406, f"frames stored as {inst.transfer_syntax.name} cannot be sent in"
                            " any media type and transfer syntax the Accept header allows")
    return choice


async def _send_frames(request: web.Request, note: AccessNote, inst: StoredInstance,
                       indexes: list[int], media: str, ts: str) -> web.StreamResponse:
    writer = MultipartWriter(request, media)
    note.stream = writer.response
    for index in indexes:
        try:
            data = await asyncio.to_thread(frame_bytes, inst, index, ts)
        except DecodeError as exc:
            if writer.parts:  # the answer has started: it can only end early
                raise
            raise not_acceptable(exc) from None
        await writer.add_bytes(f"{media}; transfer-syntax={ts}", data)
    note.add(f"{len(indexes)} frame(s) as {UID(ts).name}")
    return await writer.finish()


@audited("dicomweb.frames", "instance")
async def retrieve_frames(request: web.Request, note: AccessNote) -> web.StreamResponse:
    inst = await _opened(request, note)
    numbers = frame_numbers(request, inst)
    media, ts = _frame_choice(request, inst)
    return await _send_frames(request, note, inst, [n - 1 for n in numbers], media, ts)


def _bulk_value(inst: StoredInstance, path: str) -> bytes | None:
    """The value at ``tag/item/tag...`` from the header, else from the whole dataset."""
    for ds in (little_endian(inst.header), None):
        current: Dataset = ds if ds is not None else full_dataset(inst.path)
        parts = path.split("/")
        try:
            for tag_text, item in zip(parts[:-1:2], parts[1::2], strict=True):
                current = current[int(tag_text, 16)].value[int(item)]
            value = current[int(parts[-1], 16)].value
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if isinstance(value, bytes):
            return value
    return None


async def _pixel_bulk(request: web.Request, note: AccessNote, inst: StoredInstance
                      ) -> web.StreamResponse:
    """All the pixel data: one part when uncompressed, one part per frame when compressed."""
    assert inst.pixels is not None
    media, ts = _frame_choice(request, inst)
    if inst.encapsulated and ts == str(inst.transfer_syntax):
        return await _send_frames(request, note, inst, list(range(inst.frames)), media, ts)
    writer = MultipartWriter(request, accept.OCTET_STREAM)
    note.stream = writer.response
    content_type = f"{accept.OCTET_STREAM}; transfer-syntax={accept.EXPLICIT_LE}"
    size = frame_length(inst)
    if inst.sliceable and size is not None:
        await writer.add_file(content_type, inst.path, inst.pixels.offset, size * inst.frames)
    else:
        try:
            data = b"".join([await asyncio.to_thread(frame_bytes, inst, i, ts)
                             for i in range(inst.frames)])
        except DecodeError as exc:
            raise not_acceptable(exc) from None
        await writer.add_bytes(content_type, data)
    note.add("pixel data")
    return await writer.finish()


@audited("dicomweb.bulkdata", "instance")
async def retrieve_bulkdata(request: web.Request, note: AccessNote) -> web.StreamResponse:
    path = request.match_info["path"]
    if not BULK_PATH.match(path):
        raise ApiError(400, "a bulk data path is a tag, optionally inside sequence items")
    inst = await _opened(request, note)
    if inst.pixels is not None and path.upper() == f"{inst.pixels.tag:08X}":
        return await _pixel_bulk(request, note, inst)
    if int(path[:8], 16) in PIXEL_TAGS and "/" not in path:
        raise ApiError(404, "this instance has no such pixel data")
    choices = accept.accepted(request.headers.get("Accept"), accept.frame_choices)
    if not any(media in (None, accept.OCTET_STREAM) for media, _ in choices):
        raise ApiError(406, "bulk data is sent as application/octet-stream")
    value = await asyncio.to_thread(_bulk_value, inst, path)
    if value is None:
        raise ApiError(404, "this instance has no binary value at this bulk data path")
    writer = MultipartWriter(request, accept.OCTET_STREAM)
    note.stream = writer.response
    await writer.add_bytes(f"{accept.OCTET_STREAM}; transfer-syntax={accept.EXPLICIT_LE}",
                           value)
    note.add(f"bulk data {path.upper()[:8]}")
    return await writer.finish()


async def _render_response(request: web.Request, note: AccessNote, inst: StoredInstance,
                           indexes: list[int], thumbnail: bool) -> web.StreamResponse:
    query = request.query
    media = accept.accepted(query.get("accept") or request.headers.get("Accept"),
                            accept.rendered_choice)
    options = parse_options(query, media, thumbnail)
    if inst.pixels is None:
        raise ApiError(406, "this instance has no pixel data to render as an image")
    try:
        images = [await asyncio.to_thread(render, inst, i, options) for i in indexes]
    except DecodeError as exc:
        raise ApiError(406, str(exc)) from None
    note.add(f"{len(images)} frame(s) rendered as {media}")
    if len(images) == 1:
        return web.Response(body=images[0], headers={"Content-Type": media})
    writer = MultipartWriter(request, media)
    note.stream = writer.response
    for image in images:
        await writer.add_bytes(media, image)
    return await writer.finish()


@audited("dicomweb.rendered", "instance")
async def rendered_instance(request: web.Request, note: AccessNote) -> web.StreamResponse:
    """The first frame rendered (a multi-frame instance's frames: use the frames resource)."""
    inst = await _opened(request, note)
    return await _render_response(request, note, inst, [0], thumbnail=False)


@audited("dicomweb.rendered", "instance")
async def rendered_frames(request: web.Request, note: AccessNote) -> web.StreamResponse:
    inst = await _opened(request, note)
    numbers = frame_numbers(request, inst)
    return await _render_response(request, note, inst, [n - 1 for n in numbers], False)


def _representative(request: web.Request, rows: list[InstanceRow]) -> Path:
    """The middle image of the first series that has stored images."""
    if request.app[ROUTER_KEY].blobs.remote:  # the view's word: not a download per image
        images = [r for r in rows if r.has_pixels and r.available]
    else:
        images = [r for r in rows if r.has_pixels and blob_path(request, r) is not None]
    if not images:
        raise ApiError(404, "no stored image to make a thumbnail from")
    first = [r for r in images if r.series == images[0].series]
    path = blob_path(request, first[len(first) // 2])
    if path is None:
        raise ApiError(404, "no stored image to make a thumbnail from")
    return path


async def _thumbnail(request: web.Request, note: AccessNote) -> web.StreamResponse:
    rows = await find_instances(request, note)
    path = await asyncio.to_thread(_representative, request, rows)
    inst = await asyncio.to_thread(open_instance, path)
    indexes = [0]
    if "frames" in request.match_info:
        indexes = [frame_numbers(request, inst)[0] - 1]
    return await _render_response(request, note, inst, indexes, thumbnail=True)


def thumbnail_of(level: str) -> Handler:
    """The thumbnail handler of a study, series, instance or frame (one name per route)."""

    async def handler(request: web.Request, note: AccessNote) -> web.StreamResponse:
        return await _thumbnail(request, note)

    handler.__name__ = handler.__qualname__ = f"{level}_thumbnail"
    return audited("dicomweb.thumbnail", level)(handler)
