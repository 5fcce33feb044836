"""One real-browser test: the control panel served by Voila, driven in headless Debian Chromium by
Playwright (FIELD_NOTES section 8). It moves the rank slider, sees the memory estimate change, and saves a
screenshot of the panel."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "02_tune_lora.ipynb"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (`apt-get install chromium`; make test installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def voila(tmp_path):
    port = _free_port()
    log = open(tmp_path / "voila.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}",
                                "--Voila.ip=127.0.0.1"], cwd=NOTEBOOK.parent, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "api", timeout=2)
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "voila.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
    log.close()


def test_rank_slider_changes_the_estimate_in_a_real_browser(voila, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(voila, timeout=180_000)
        estimate = page.locator(".estimate").first
        estimate.wait_for(timeout=180_000)
        before = estimate.inner_text()
        rank_before = page.locator(".widget-readout").first.inner_text()
        handle = page.locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")  # one step up the rank slider (8 -> 16)
        page.wait_for_function("(old) => document.querySelector('.estimate').innerText !== old", arg=before,
                               timeout=60_000)
        after = estimate.inner_text()
        rank_after = page.locator(".widget-readout").first.inner_text()
        shot = tmp_path / "panel.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert int(rank_after) > int(rank_before), (rank_before, rank_after)
    assert before != after, before
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
