"""The OHIF viewer in Chromium (Playwright, Debian's /usr/bin/chromium) against ``dicom-router
serve``: log in, the study list shows the stored studies, and ``/viewer?StudyInstanceUIDs=``
renders an uncompressed CT (sent by storescu) and a JPEG 2000 image (sent by STOW-RS) on
non-blank canvases, with every request answered (no failed DICOMweb call, no missing asset,
nothing fetched from another origin, no CSP violation).

Also, in process: how the OHIF files are served (paths, headers, the marker), the page shown
without the dist, and who may open the viewer. The dist is installed by scripts/fetch-ohif,
which scripts/test runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD
from tests.e2e.conftest import DCMTK_ENV, ROUTER_AET, RouterProcess, wait_for
from tests.web_harness import Browser, bearer
from web import viewer

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT = TEST_FILES / "CT_small.dcm"  # explicit VR little endian
JPEG_2000 = TEST_FILES / "MR_small_jp2klossless.dcm"  # JPEG 2000 lossless
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "a long enough password"

# Pixels of every viewport canvas that are not black (cornerstone draws into 2D canvases).
LIT_CANVASES = """() => Array.from(document.querySelectorAll('canvas')).filter(c => {
  if (!c.width || !c.height || c.getContext === undefined) return false;
  let ctx; try { ctx = c.getContext('2d', {willReadFrequently: true}); } catch (e) { return false; }
  if (!ctx) return false;
  const data = ctx.getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 16 || data[i + 1] > 16 || data[i + 2] > 16) lit++;
  }
  return lit > 0.02 * c.width * c.height;
}).length"""


@pytest.fixture(scope="module")
def dist() -> viewer.Dist:
    found, reason = viewer.load_dist()
    assert found is not None, f"{reason} Run scripts/fetch-ohif (scripts/test does)."
    return found


class PageWatch:
    """Everything that went wrong while a page was open."""

    def __init__(self, page: Any, origin: str) -> None:
        self.problems: list[str] = []
        self.dicomweb: list[str] = []
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("request", lambda r: r.url.startswith((origin, "data:", "blob:"))
                or self.problems.append(f"other origin: {r.url}"))
        page.on("console", lambda m: "Content Security Policy" in m.text
                and self.problems.append(f"CSP: {m.text[:300]}"))

    def _failed(self, request: Any) -> None:
        # The browser fetches the site icon after a page has loaded; navigating on at once
        # aborts that fetch, which is no fault of the page.
        if "ERR_ABORTED" in (request.failure or "") and "/favicon." in request.url:
            return
        self.problems.append(f"failed: {request.method} {request.url} {request.failure}")

    def _response(self, response: Any) -> None:
        if "/dicom-web/" in response.url:
            self.dicomweb.append(response.url)
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")


@pytest.fixture
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def start_router(serve_router: Any, monkeypatch: pytest.MonkeyPatch) -> RouterProcess:
    monkeypatch.setenv("DICOM_ROUTER_ADMIN_PASSWORD", ADMIN_PASSWORD)
    return serve_router().start()


def store(router: RouterProcess) -> None:
    """The CT from a modality (storescu), the JPEG 2000 image by STOW-RS."""
    subprocess.run(["storescu", "-aet", "CT_SCANNER", "-aec", ROUTER_AET, "127.0.0.1",
                    str(router.dicom_port), str(CT)], env=DCMTK_ENV, check=True, timeout=60)
    base = f"http://127.0.0.1:{router.http_port}"
    client = DICOMwebClient(url=f"{base}/dicom-web",
                            headers=bearer(base, "admin", ADMIN_PASSWORD))
    client.store_instances([pydicom.dcmread(JPEG_2000)])
    wait_for(lambda: len(router.view("studies", "SELECT 1 FROM studies")) == 2, 30,
             "both studies in the studies view")


def log_in(page: Any, base: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


@pytest.mark.slow
@pytest.mark.dcmtk
def test_ohif_lists_and_renders_a_ct_and_a_jpeg_2000_image(
        serve_router: Any, monkeypatch: pytest.MonkeyPatch, chromium: Any, dcmtk: None,
        dist: viewer.Dist) -> None:
    router = start_router(serve_router, monkeypatch)
    store(router)
    base = f"http://127.0.0.1:{router.http_port}"
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, base)
    log_in(page, base)

    page.goto(base + "/viewer")
    assert page.url == base + "/ohif/"
    # One row per study: both patients are "CompressedSamples^..." (CT1 and MR1).
    rows = page.get_by_text(re.compile(r"^CompressedSamples"))
    wait_for(lambda: rows.count() == 2, 60, "both studies in OHIF's study list")
    assert page.evaluate("window.crossOriginIsolated") is True

    for path in (CT, JPEG_2000):
        study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        page.goto(f"{base}/viewer?StudyInstanceUIDs={study}")
        assert page.url == f"{base}/ohif/viewer?StudyInstanceUIDs={study}"
        # Polled from here: a predicate string would be eval'ed in the page, which its CSP
        # (rightly) forbids.
        wait_for(lambda: page.evaluate(LIT_CANVASES) >= 1, 90, f"{path.name} on a canvas")
        page.screenshot(path=str(router.folder / f"{path.stem}.png"))
    assert any("/frames/" in url for url in watch.dicomweb), watch.dicomweb
    assert watch.problems == []
    opened = router.view("audit", "SELECT study_instance_uid FROM audit "
                                  "WHERE action = 'viewer.open'")
    assert len(opened) == 2


def test_viewer_without_the_dist_says_how_to_install_it(
        web_router: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(viewer, "DIST_DIR", tmp_path / "no-dist")
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    for path in ("/viewer?StudyInstanceUIDs=1.2.3", "/ohif/", "/ohif/app.bundle.js"):
        page = browser.get(server.url + path, allow_redirects=False)
        assert page.status_code == 503 and "scripts/fetch-ohif" in page.text
        assert "script-src 'self'; object-src" in page.headers["Content-Security-Policy"]
    assert browser.get(server.url + "/healthz").status_code == 200  # the router runs


def test_a_dist_prepared_for_another_prefix_is_refused(
        web_router: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "dist"
    other.mkdir()
    (other / "index.html").write_text("<html></html>")
    (other / viewer.MARKER).write_text(json.dumps({"prefix": "/", "version": "3.13.2"}))
    monkeypatch.setattr(viewer, "DIST_DIR", other)
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(server.url + "/viewer")
    assert page.status_code == 503 and "another path" in page.text


def test_ohif_files_are_served_from_the_dist_only(web_router: Any, dist: viewer.Dist) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    get = lambda path, **kw: browser.get(server.url + path, allow_redirects=False,  # noqa: E731
                                         timeout=30, **kw)
    index = get("/ohif/viewer")
    csp = index.headers["Content-Security-Policy"]
    assert index.status_code == 200 and 'window.PUBLIC_URL="/ohif/"' in index.text
    assert "'wasm-unsafe-eval'" in csp and "worker-src 'self' blob:" in csp
    assert "'unsafe-eval'" not in csp and "http" not in csp
    assert index.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    config = get("/ohif/app-config.js")
    assert config.text == viewer.APP_CONFIG.read_text() and "https://" not in config.text
    bundle = next(p.name for p in dist.root.glob("app.bundle.*.js"))
    script = get(f"/ohif/{bundle}", headers={"Accept-Encoding": "gzip"})
    assert script.status_code == 200 and script.headers["Content-Encoding"] == "gzip"
    assert "immutable" in script.headers["Cache-Control"]
    assert script.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    for hostile in ("/ohif/.dicom-router.json", "/ohif/%2e%2e/README.md", "/ohif/..%2fREADME.md",
                    "/ohif/assets/..%2f..%2f..%2fviewer.py", "/ohif/no-such-chunk.js",
                    "/ohif/%00.js", "/ohif/a%5c..%5cindex.html"):
        assert get(hostile).status_code == 404, hostile
    assert get("/viewer?StudyInstanceUIDs=1.2.3,../../x").status_code == 400
    assert get("/viewer?StudyInstanceUIDs=1.2.3&StudyInstanceUIDs=1.2.4").headers[
        "Location"] == "/ohif/viewer?StudyInstanceUIDs=1.2.3,1.2.4"


def test_the_viewer_needs_the_viewer_permission(web_router: Any, dist: viewer.Dist) -> None:
    server = web_router()
    for name, role in (("rad", "radiologist"), ("op", "operator"), ("aud", "auditor")):
        server.router.users.add(name, role, PASSWORD, Actor("admin"))
    for name, allowed in (("rad", True), ("op", False), ("aud", False)):
        browser = Browser(server.url)
        browser.login(name, PASSWORD)
        for path in ("/viewer", "/ohif/", "/ohif/app-config.js"):
            status = browser.get(server.url + path, allow_redirects=False).status_code
            assert (status in (200, 302)) if allowed else status == 403, (name, path, status)
    anonymous = requests.get(server.url + "/ohif/viewer", allow_redirects=False, timeout=10)
    assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith("/login")


def test_fetch_script_prepares_the_dist_for_the_prefix_the_router_serves() -> None:
    script = (Path(__file__).parents[2] / "scripts" / "fetch-ohif").read_text()
    assert f'PREFIX = "{viewer.OHIF_PREFIX}"' in script
