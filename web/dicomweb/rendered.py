"""Rendered frames and thumbnails (PS3.18 8.3.5): a frame decoded, through the modality and VOI
transforms (``window=center,width[,linear|linear-exact|sigmoid]`` or the instance's own window,
else the frame's range), cropped and scaled (``viewport=vw,vh[,sx,sy,sw,sh]``) and encoded as
JPEG (``quality``) or PNG with Pillow. Colour images are shown as they are.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from web.api.common import ApiError
from web.dicomweb.stored import StoredInstance, decode_frame

KNOWN = frozenset({"window", "viewport", "quality", "accept", "annotation", "iccprofile"})
FUNCTIONS = ("linear", "linear-exact", "sigmoid")
MAX_SIDE = 8192
THUMBNAIL = 128  # default thumbnail viewport (pixels on each side)


class RenderError(ApiError):
    """A bad rendering parameter (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    region: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh (negative: flipped)


@dataclass(frozen=True)
class RenderOptions:
    media: str  # image/jpeg | image/png
    quality: int = 90
    window: tuple[float, float, str] | None = None
    viewport: Viewport | None = None


def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise RenderError(f"{name} takes comma-separated numbers") from None
    if len(values) not in count or not all(np.isfinite(values)):
        raise RenderError(f"{name} takes {' or '.join(map(str, count))} numbers")
    return values


def _window(text: str) -> tuple[float, float, str]:
    parts = text.split(",")
    function = parts.pop().strip().lower() if len(parts) == 3 else "linear"
    if function not in FUNCTIONS:
        raise RenderError(f"window function must be one of {', '.join(FUNCTIONS)}")
    center, width = _numbers(",".join(parts), "window", (2,))
    if width <= 0 or (function == "linear" and width < 1):
        raise RenderError("window width must be positive (at least 1 for linear)")
    return center, width, function


def _viewport(text: str) -> Viewport:
    values = [int(v) for v in _numbers(text, "viewport", (2, 6))]
    if not all(1 <= v <= MAX_SIDE for v in values[:2]):
        raise RenderError(f"viewport width and height must be 1..{MAX_SIDE}")
    region = (values[2], values[3], values[4], values[5]) if len(values) == 6 else None
    if region is not None and (region[0] < 0 or region[1] < 0 or 0 in region[2:]):
        raise RenderError("viewport region needs sx, sy >= 0 and non-zero sw, sh")
    return Viewport(values[0], values[1], region)


def parse_options(query: Mapping[str, str], media: str, thumbnail: bool = False
                  ) -> RenderOptions:
    unknown = set(query) - KNOWN
    if unknown:
        raise RenderError(f"unknown rendering parameter {sorted(unknown)[0][:64]!r}")
    quality = 90
    if "quality" in query:
        try:
            quality = int(query["quality"])
        except ValueError:
            raise RenderError("quality must be a whole number 1..100") from None
        if not 1 <= quality <= 100:
            raise RenderError("quality must be a whole number 1..100")
    window = _window(query["window"]) if "window" in query else None
    viewport = _viewport(query["viewport"]) if "viewport" in query else None
    if viewport is None and thumbnail:
        viewport = Viewport(THUMBNAIL, THUMBNAIL)
    return RenderOptions(media, quality, window, viewport)


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: linear, linear-exact and sigmoid VOI functions to 0..255."""
    if function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "linear-exact":
        return np.clip(((values - center) / width + 0.5) * 255.0, 0, 255)
    return np.clip(((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0, 0, 255)


def _stretched(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def _first(value: Any) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _header_window(ds: Dataset) -> tuple[float, float, str] | None:
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
    function = function if function in FUNCTIONS else "linear"
    return (center, width, function) if width >= 1 else None


def _grayscale(array: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None
               ) -> np.ndarray:
    values = np.asarray(apply_modality_lut(array, ds), dtype=np.float64)
    chosen = window or _header_window(ds)
    if chosen is not None:
        out = _windowed(values, *chosen)
    elif "VOILUTSequence" in ds:
        out = _stretched(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    else:
        out = _stretched(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255.0 - out
    return out.astype(np.uint8)


def _colour(array: np.ndarray, ds: Dataset) -> np.ndarray:
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    if array.dtype == np.uint8:
        return array
    top = float(array.max()) or 1.0
    return (array.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def to_8bit(array: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None
            ) -> np.ndarray:
    colour = array.ndim == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    return _colour(array, ds) if colour else _grayscale(array, ds, window)


def _apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    if viewport is None:
        return image
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        box = (sx, sy, min(sx + abs(sw), image.width), min(sy + abs(sh), image.height))
        if box[0] >= box[2] or box[1] >= box[3]:
            raise RenderError("viewport region lies outside the image")
        image = image.crop(box)
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def render(inst: StoredInstance, index: int, options: RenderOptions) -> bytes:
    """Frame ``index`` (0-based) rendered as options.media."""
    array = decode_frame(inst, index)
    image = _apply_viewport(Image.fromarray(to_8bit(array, inst.header, options.window)),
                            options.viewport)
    out = io.BytesIO()
    if options.media == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()
