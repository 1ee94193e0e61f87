"""The Gradio chat page (``--ui``) driven by a real headless Chromium through Playwright.

Needs Debian's chromium and playwright-python (no browser download):
    apt-get install -y chromium
    pip install playwright
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from PIL import Image

import mmkit

CHROMIUM = os.environ.get("MMKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
NEW_TOKENS = 16

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'mmkit[serve]')")

from mmkit.infer.chat import chat  # noqa: E402
from mmkit.serve.app import ServeConfig, create_app  # noqa: E402
from tests.test_chat_cli import make_chat_model_dir  # noqa: E402
from tests.test_serve import running_server  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def outbound(monkeypatch):
    """Every non-loopback host this process tries to resolve or connect to (must stay empty)."""
    seen = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *a, **k):
        if host not in LOOPBACK and host is not None:
            seen.append(host)
        return real_getaddrinfo(host, *a, **k)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            seen.append(address[0])
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def _bot_texts(page) -> list[str]:
    return [el.inner_text().strip() for el in page.query_selector_all('#mmkit-chatbot [data-testid="bot"]')]


def _wait_answer(page, index: int, expected: str, timeout: float = 90) -> list[str]:
    """Poll the index-th bot message until it reads ``expected``; returns the distinct texts seen on the way."""
    seen: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        texts = _bot_texts(page)
        cur = texts[index] if len(texts) > index else ""
        if cur and (not seen or seen[-1] != cur):
            seen.append(cur)
        if cur == expected:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"bot message {index} never read {expected!r}; saw {seen}")


def test_upload_ask_and_see_a_streamed_answer(tmp_path, outbound):
    model = mmkit.load(make_chat_model_dir(tmp_path / "model")).eval()
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(image_path)
    img = Image.open(image_path).convert("RGB")
    r1, h1 = chat(model, img, "what color is the shape ?", max_new_tokens=NEW_TOKENS)
    r2, _ = chat(model, None, "and its shape ?", history=h1, max_new_tokens=NEW_TOKENS)

    # a slow model makes streaming visible in the page: 40 ms per forward pass (on the decoder, which the serving
    # engine calls directly, bypassing the LM head's module)
    handle = model.llm.get_decoder().register_forward_pre_hook(lambda *a: time.sleep(0.04))
    app = create_app(model, ServeConfig(model_name="tiny"), ui=True)
    browser_requests: list[str] = []
    try:
        with running_server(app) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("request", lambda req: browser_requests.append(req.url))
                page.goto(base + "/ui/")
                page.wait_for_selector("#mmkit-input textarea", timeout=60_000)
                page.set_input_files("#mmkit-image input[type=file]", str(image_path))
                page.wait_for_selector("#mmkit-image img", timeout=30_000)
                slider = page.locator("#mmkit-max-tokens input[type=number]")
                slider.fill(str(NEW_TOKENS))
                slider.press("Enter")
                time.sleep(0.3)

                page.fill("#mmkit-input textarea", "what color is the shape ?")
                page.click("#mmkit-send")
                partial1 = _wait_answer(page, 0, r1)
                assert len(partial1) >= 3, f"not streamed: {partial1}"  # the text grew in several steps
                assert all(r1.startswith(p) for p in partial1)

                page.fill("#mmkit-input textarea", "and its shape ?")
                page.press("#mmkit-input textarea", "Enter")
                _wait_answer(page, 1, r2)  # the second turn saw the image and the first exchange
                time.sleep(0.5)
                assert _bot_texts(page) == [r1, r2]
                users = [el.inner_text().strip()
                         for el in page.query_selector_all('#mmkit-chatbot [data-testid="user"]')]
                assert users == ["what color is the shape ?", "and its shape ?"]
                shot = tmp_path / "webui.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                print(f"screenshot: {shot}")
            finally:
                browser.close()
    finally:
        handle.remove()
    assert browser_requests and all(u.startswith(("http://127.0.0.1", "data:", "blob:")) for u in browser_requests), \
        [u for u in browser_requests if not u.startswith("http://127.0.0.1")]
    assert outbound == [], f"the server tried to reach the network: {outbound}"
