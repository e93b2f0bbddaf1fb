"""Real browser: headless Debian chromium (Playwright) against `minimind web` (Streamlit) on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tokenizer_dir
from web_helpers import save_tiny_model

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_streamlit_in_chromium(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    tok = tokenizer_dir("minimind2")
    model = save_tiny_model(tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "import sys; from minimind.apps.web import main; sys.exit(main(sys.argv[1:]))",
           "--model", str(model), "--tokenizer", str(tok), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
                box = page.get_by_test_id("stChatInputTextArea")
                box.wait_for(timeout=120_000)  # the model loads on the first run
                box.fill("What is MiniMind?")
                box.press("Enter")
                speed = page.locator('[data-testid="stChatMessage"] [data-testid="stCaptionContainer"]',
                                     has_text="tokens/s")
                speed.first.wait_for(timeout=120_000)
                messages = page.get_by_test_id("stChatMessage")
                assert messages.count() == 2
                assert "What is MiniMind?" in messages.nth(0).inner_text()
                answer = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text()
                speed_text = speed.first.inner_text()
                page.screenshot(path=str(tmp_path / "streamlit_chat.png"), full_page=True)
                print(f"screenshot: {tmp_path / 'streamlit_chat.png'}; answer: {answer[:80]!r}")
            finally:
                browser.close()
        assert (tmp_path / "streamlit_chat.png").stat().st_size > 0
        assert answer.strip() and "tokens/s" not in answer  # the streamed answer itself, not just its speed line
        assert int(speed_text.split()[0]) >= 1
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
