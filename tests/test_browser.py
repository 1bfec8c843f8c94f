"""The search page in a real headless Chromium: a text query and a file query, results of every
modality render (images load, audio players have sources, point clouds are drawn), a screenshot.

Chromium is Debian's `chromium` package, installed here when missing and possible (root + apt);
the browser is driven with Playwright's Python API against that executable (no browser download)."""

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
                break
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("no Chromium here, and Debian's chromium package could not be installed (not root, no apt, or offline)")


@pytest.fixture(scope="module")
def server(searchable):
    import uvicorn

    from pairfree.search import Searcher
    from pairfree.search.service import Service, create_app

    world, media, um, stores, index = searchable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(Service({"toy": Searcher(index, um)})), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", media
    srv.should_exit = True
    t.join(timeout=10)


def test_page_runs_text_and_file_queries(server, tmp_path):
    url, media = server
    exe = chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#targets input")
        page.fill("#text", "c017")
        page.click("button[type=submit]")
        for m in ("image", "audio", "3d", "text"):
            page.wait_for_selector(f"section[data-modality='{m}'] .card")
        page.wait_for_function("[...document.querySelectorAll('section[data-modality=image] img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        srcs = page.eval_on_selector_all("section[data-modality=audio] audio", "els => els.map(e => e.src)")
        assert srcs and all("/media/toy/audio/" in s for s in srcs)
        page.wait_for_function("[...document.querySelectorAll('section[data-modality=\"3d\"] canvas')]"
                               ".every(c => Number(c.dataset.rendered) > 0)")
        captions = page.eval_on_selector_all("section[data-modality=text] .caption", "els => els.map(e => e.textContent)")
        assert any("c017" in c for c in captions)
        page.screenshot(path=str(tmp_path / "search-text-query.png"), full_page=True)
        # a file query: the page's file input, as a drop would do
        page.set_input_files("#file", str(media / "test" / "audio" / "00011.wav"))
        page.wait_for_function("document.getElementById('status').textContent.startsWith('audio query')")
        first_audio = page.eval_on_selector("section[data-modality=audio] audio", "e => e.src")
        assert first_audio.endswith("/media/toy/audio/11")  # the clip itself comes first
        page.screenshot(path=str(tmp_path / "search-file-query.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "search-text-query.png").stat().st_size > 10_000
    print(f"screenshots in {tmp_path}")
