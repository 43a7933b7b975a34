"""The operator page in a real headless Chromium: it loads, counts live while frames flow, shows the reject."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engines.types import Geometry
from tests.test_daemon_support import Client, FakeInspector, running

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GEOMETRY = Geometry(240, 320, 1, "uint8")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium)")


def part(defect: bool) -> np.ndarray:
    """A part-like frame: a bright plate with holes; a defect is a dark scratch-like blob that scores high."""
    img = np.full(GEOMETRY.shape, 60, np.uint8)
    img[30:210, 40:280] = 110
    for x in range(70, 280, 60):
        img[100:140, x : x + 20] = 40
    if defect:
        img[160:172, 180:230] = 255
    return img


def test_status_page_updates_live_and_shows_the_reject(tmp_path: Path) -> None:
    """Counters on the page change while frames flow; the reject thumbnail appears; a screenshot is saved."""
    playwright = pytest.importorskip("playwright.sync_api")
    fake = FakeInspector(geometry=GEOMETRY, infer_s=0.005)
    with running(fake, status_refresh_s=0.2) as (server, _), Client(server) as client:
        stop = threading.Event()

        def camera() -> None:
            i = 0
            while not stop.is_set():
                client.send(i, part(defect=i % 7 == 3), geometry=GEOMETRY)
                client.decisions(1, timeout_s=1)
                i += 1
                time.sleep(0.05)

        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"http://{server.endpoints['http']}/", wait_until="load")
                page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=10_000)
                assert page.text_content("#state") == "IDLE" and page.text_content("#model") == "fake-1"
                sender = threading.Thread(target=camera, daemon=True)
                sender.start()
                try:
                    page.wait_for_function("Number(document.getElementById('t_pass').textContent) >= 3", timeout=10_000)
                    first = int(page.text_content("#t_pass") or 0)
                    page.wait_for_function(
                        f"Number(document.getElementById('t_pass').textContent) > {first}", timeout=10_000
                    )
                    page.wait_for_function("document.getElementById('thumb').naturalWidth > 0", timeout=10_000)
                    page.wait_for_function(
                        "Number(document.getElementById('t_reject').textContent) >= 2", timeout=10_000
                    )
                finally:
                    stop.set()
                    sender.join(5)
                time.sleep(0.5)
                assert int(page.text_content("#t_reject") or 0) >= 2
                assert "defect" in (page.text_content("#reasons") or "")
                assert page.locator("#recent tbody tr").count() >= 5
                assert page.get_attribute("#thumb", "src").startswith("/reject.jpg?v=")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "status_page.png"), full_page=True)
            finally:
                browser.close()
    assert (ARTIFACTS / "status_page.png").stat().st_size > 10_000
