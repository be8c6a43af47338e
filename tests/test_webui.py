"""The WebUI in a real headless browser (Debian's chromium driven by Playwright) against the real
gateway and tritonserver: upload an image, ask, see the answer stream in, ask a follow-up."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from gateway.app import create_app
from gateway.keys import KeyStore

from .conftest import png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui_url(server, tmp_path_factory):
    from webui.app import build

    store = KeyStore(tmp_path_factory.mktemp("webui") / "keys.json")
    key, _ = store.create("browser", "vip")
    port = free_port()
    gateway = uvicorn.Server(uvicorn.Config(create_app(server.grpc_url, store), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=gateway.run, daemon=True).start()
    while not gateway.started:
        time.sleep(0.05)
    page = build(f"http://127.0.0.1:{port}/v1", key, max_tokens=12)
    ui_port = free_port()
    page.launch(server_name="127.0.0.1", server_port=ui_port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{ui_port}/"
    page.close()
    gateway.should_exit = True


def test_upload_ask_stream_and_follow_up_in_a_browser(webui_url, tmp_path, caplog):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "shapes.png"
    image.write_bytes(png(448, 448, seed=5))
    with caplog.at_level(logging.INFO, logger="qwen3vl.gateway"), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.goto(webui_url)
        bot = page.locator("#chat .message-row.bot-row")
        page.locator("#ask input[type=file]").set_input_files(str(image))
        page.locator("#ask textarea").fill("What is in this picture?")
        page.locator("#ask textarea").press("Enter")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat .message-row.bot-row')].some(r => r.innerText.trim().length > 0)",
            timeout=60_000,
        )
        page.wait_for_function("() => !document.querySelector('#ask textarea').disabled", timeout=60_000)
        page.locator("#ask textarea").fill("And what colours does it have?")
        page.locator("#ask textarea").press("Enter")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat .message-row.bot-row')].filter(r => r.innerText.trim()).length >= 2",
            timeout=60_000,
        )
        page.wait_for_function("() => !document.querySelector('#ask textarea').disabled", timeout=60_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
        answers = bot.all_inner_texts()
        browser.close()
    assert len(answers) == 2 and all(a.strip() for a in answers)
    # The gateway logs a turn once its stream has ended, which can trail the page's last text.
    deadline = time.monotonic() + 10
    while len(caplog.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    turns = [json.loads(r.getMessage()) for r in caplog.records]
    assert [t["status"] for t in turns] == [200, 200]
    # The image went with the first question and stays in the conversation for the follow-up.
    assert turns[0]["prompt_tokens"] > 64 and turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]
    assert (ARTIFACTS / "webui.png").stat().st_size > 10_000


def test_history_becomes_openai_turns_with_images_first(tmp_path):
    from webui.app import to_openai

    image = tmp_path / "a.png"
    image.write_bytes(png(32, 32))
    history = [
        {"role": "user", "content": {"path": str(image)}},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Colour?"},
    ]
    messages = to_openai(history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    first = messages[0]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first[1] == {"type": "text", "text": "What is it?"}
    assert messages[2]["content"] == [{"type": "text", "text": "Colour?"}]


def test_html_answers_render_in_a_sandboxed_frame():
    from webui.app import html_preview

    frame = html_preview('Here:\n```html\n<p class="x">Hi & bye</p>\n```')
    assert frame.startswith("<iframe sandbox ") and 'srcdoc="<p class=&quot;x&quot;>Hi &amp; bye</p>' in frame
    assert html_preview("no code here") == ""
