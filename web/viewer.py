"""The OHIF viewer: ``/viewer?StudyInstanceUIDs=...`` opens a study; the prebuilt OHIF dist
(installed by scripts/fetch-ohif, git-ignored) is served same-origin under ``/ohif/`` with our
own app-config.js and, on its pages only, the looser CSP it needs (wasm, workers, blob:).
Without the dist the router runs and these paths say how to fetch it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from aiohttp import web

from router.application.sessions import AccessRecord
from web.auth import record_access
from web.render import render
from web.routes import Route

HERE = Path(__file__).parent
OHIF_PREFIX = "/ohif/"  # scripts/fetch-ohif rewrites the bundle for this prefix
DIST_DIR = HERE / "ohif" / "dist"  # module-level so that tests can point it elsewhere
APP_CONFIG = HERE / "ohif" / "app-config.js"
MARKER = ".dicom-router.json"
FETCH_COMMAND = "scripts/fetch-ohif"
MAX_STUDIES = 20  # StudyInstanceUIDs per link

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.")  # webpack content hashes: never change
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)

# What OHIF needs on its own pages: wasm codecs, workers (some from blob: URLs), canvases
# read back as blobs, inline styles set by its UI library; still same-origin only.
OHIF_CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' {hashes}; "
    "worker-src 'self' blob:; child-src 'self' blob:; connect-src 'self' blob: data:; "
    "img-src 'self' data: blob:; media-src 'self' blob:; font-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'; manifest-src 'self'"
)


@dataclass(frozen=True)
class Dist:
    """An installed OHIF dist: its folder, patched index.html and that page's CSP."""

    root: Path
    version: str
    index: bytes
    csp: str


# Cross-origin isolation lets the viewer use SharedArrayBuffer (faster volume loading); its
# workers must answer with the same embedder policy or the browser blocks them. Everything it
# loads is same-origin, so nothing else changes.
ISOLATION = {"Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}

_cache: dict[tuple[Path, float], Dist] = {}


def load_dist() -> tuple[Dist | None, str]:
    """The installed dist, or None and why not (shown on the viewer_missing page)."""
    root = DIST_DIR
    try:
        stamp = (root / MARKER).stat().st_mtime
    except OSError:
        return None, "The OHIF viewer is not installed on this server."
    cached = _cache.get((root, stamp))
    if cached is not None:
        return cached, ""
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
        html = (root / "index.html").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None, "The OHIF viewer's files are incomplete."
    if marker.get("prefix") != OHIF_PREFIX:
        return None, "The installed OHIF viewer was prepared for another path."
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html))
    dist = Dist(root, str(marker.get("version", "")), html.encode(),
                OHIF_CSP.format(hashes=hashes))
    _cache.clear()
    _cache[(root, stamp)] = dist
    return dist, ""


def study_uids(request: web.Request) -> list[str]:
    """StudyInstanceUIDs from the query (repeated or comma-separated); 400 if not UIDs."""
    uids = [uid.strip() for value in request.query.getall("StudyInstanceUIDs", [])
            for uid in value.split(",") if uid.strip()]
    if len(uids) > MAX_STUDIES or not all(len(u) <= 64 and _UID.match(u) for u in uids):
        raise web.HTTPBadRequest(text="StudyInstanceUIDs must be up to "
                                      f"{MAX_STUDIES} DICOM UIDs", content_type="text/plain")
    return list(dict.fromkeys(uids))


def missing(request: web.Request, reason: str) -> web.Response:
    return render(request, "viewer_missing.html", status=503, reason=reason,
                  command=FETCH_COMMAND)


async def open_viewer(request: web.Request) -> web.StreamResponse:
    """The link target of "Open in viewer": records the access, then starts OHIF."""
    uids = study_uids(request)
    dist, reason = load_dist()
    if dist is None:
        return missing(request, reason)
    for uid in uids:
        await record_access(request, AccessRecord(
            action="viewer.open", object_type="study", object_id=uid, study_instance_uid=uid,
            detail="OHIF viewer opened"))
    if not uids:
        raise web.HTTPFound(OHIF_PREFIX)
    raise web.HTTPFound(OHIF_PREFIX + "viewer?StudyInstanceUIDs=" + quote(",".join(uids),
                                                                          safe=".,"))


async def ohif_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(OHIF_PREFIX)


async def ohif_file(request: web.Request) -> web.StreamResponse:
    """A file of the dist, our app-config.js, or index.html for OHIF's own routes."""
    dist, reason = load_dist()
    if dist is None:
        return missing(request, reason)
    tail = request.match_info["tail"]
    if tail == "app-config.js":
        return web.FileResponse(APP_CONFIG, headers={
            **ISOLATION, "Content-Type": "text/javascript", "Cache-Control": "no-cache"})
    if "." not in tail.rsplit("/", 1)[-1]:  # "", "viewer", "segmentation"...: the app's routes
        return index_page(dist)
    path = dist_path(dist.root, tail)
    if path is None:
        raise web.HTTPNotFound()
    cache = "private, max-age=31536000, immutable" if _HASHED.search(path.name) \
        else "private, max-age=3600"
    return web.FileResponse(path, headers={**ISOLATION, "Cache-Control": cache})


def index_page(dist: Dist) -> web.Response:
    return web.Response(body=dist.index, content_type="text/html", charset="utf-8", headers={
        **ISOLATION, "Content-Security-Policy": dist.csp, "Cache-Control": "no-cache",
        "Cross-Origin-Opener-Policy": "same-origin"})


def dist_path(root: Path, tail: str) -> Path | None:
    """The file ``tail`` names inside ``root``; None for anything else (never outside it,
    never a hidden file such as the marker)."""
    if "\\" in tail or "\0" in tail:
        return None
    parts = PurePosixPath(tail).parts
    if not parts or any(p in ("", "..") or p.startswith(".") for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        return None
    return resolved


ROUTES = [
    Route("GET", "/viewer", open_viewer, "viewer",
          summary="Open the OHIF viewer (?StudyInstanceUIDs=uid[,uid...])", query=(
              "StudyInstanceUIDs",), tags=("viewer",)),
    Route("GET", "/ohif", ohif_root, "viewer", summary="The OHIF viewer", tags=("viewer",)),
    Route("GET", "/ohif/{tail:.*}", ohif_file, "viewer",
          summary="The OHIF viewer's files and routes", tags=("viewer",)),
]
