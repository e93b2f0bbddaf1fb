"""Real browser: headless Debian chromium (Playwright) against both web UIs served on 127.0.0.1.

Streamlit runs in a subprocess (`minimind web`, or the same command on a small wrapper script that hands the app a
test backend); Gradio runs in this process, so a test can look at the engine behind it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tokenizer_dir
from web_helpers import XSS_ANSWER, HoldingBackend, ScriptedBackend, save_tiny_model

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TESTS = Path(__file__).resolve().parent
APP = TESTS.parent / "src" / "minimind" / "web" / "streamlit_app.py"
# Runs the real Streamlit app on a test backend built from $WEB_TEST_BACKEND (JSON, see web_helpers).
WRAPPER = """import json, os, runpy, sys
sys.path.insert(0, {tests!r})
import streamlit as st
import web_helpers

@st.cache_resource
def _backend():
    return web_helpers.backend_from_spec(json.loads(os.environ["WEB_TEST_BACKEND"]))

st.session_state["backend"] = _backend()
runpy.run_path({app!r}, run_name="__main__")
"""


@pytest.fixture
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield b
        finally:
            b.close()


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


@contextlib.contextmanager
def streamlit_app(cli_args: list[str], backend_spec: dict | None = None, tmp_path: Path | None = None):
    """`minimind web CLI_ARGS` on a free port; with backend_spec, the same Streamlit command runs the app through
    WRAPPER on that test backend. Yields the URL."""
    from minimind.apps.web import build_parser, streamlit_command

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if backend_spec is None:
        cmd = [sys.executable, "-c", "import sys; from minimind.apps.web import main; sys.exit(main(sys.argv[1:]))",
               *cli_args, "--port", str(port)]
    else:
        from minimind.web.text import LANG_ENV

        args = build_parser().parse_args([*cli_args, "--port", str(port)])
        cmd = streamlit_command(args)
        wrapper = tmp_path / "wrapped_app.py"
        wrapper.write_text(WRAPPER.format(tests=str(TESTS), app=str(APP)))
        cmd[cmd.index(str(APP))] = str(wrapper)
        env.update(WEB_TEST_BACKEND=json.dumps(backend_spec), **{LANG_ENV: args.lang})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the server's process group (`minimind web` and the Streamlit it started); SIGKILL what is left
    after `grace` seconds: once a Streamlit server outlived its parent on SIGTERM and stayed behind."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # raises once the whole group is gone
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def gradio_app(backend, **launch_kwargs):
    from minimind.web.gradio_app import launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = launch(backend, port=_free_port(), prevent_thread_lock=True, quiet=True, **launch_kwargs)
    try:
        yield demo.local_url
    finally:
        demo.close()


def _luminance(css_color: str) -> float:
    r, g, b = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def _ask_streamlit(page, url: str, question: str):
    page.goto(url, timeout=60_000)
    box = page.get_by_test_id("stChatInputTextArea")
    box.wait_for(timeout=120_000)  # the model loads on the first run
    box.fill(question)
    box.press("Enter")
    return page.get_by_test_id("stChatMessage")


def _ask_gradio(page, url: str, question: str, placeholder: str = "Ask something", themed: bool = False, **sliders):
    page.goto(url, timeout=60_000)
    if themed:  # the theme JS reloads the page once with ?__theme=...; settings typed before that reload are lost
        page.wait_for_url(re.compile(r"__theme="), timeout=60_000)
    box = page.get_by_placeholder(placeholder)
    box.wait_for(timeout=60_000)
    if sliders:
        page.locator("button.label-wrap").first.click()  # open the settings accordion
        for label, value in sliders.items():
            number = page.get_by_label(f"number input for {label}")
            number.fill(str(value))
            number.press("Enter")
    box.fill(question)
    box.press("Enter")


# ---------------------------------------------------------------- real tiny model
def test_streamlit_in_chromium(tmp_path, browser):
    """`minimind web --theme dark`: a streamed answer appears, and the page is dark even in a light browser."""
    tok = tokenizer_dir("minimind2")
    model = save_tiny_model(tmp_path)
    with streamlit_app(["--model", str(model), "--tokenizer", str(tok), "--theme", "dark"]) as url:
        page = browser.new_page(color_scheme="light")
        messages = _ask_streamlit(page, url, "What is MiniMind?")
        speed = page.locator('[data-testid="stChatMessage"] [data-testid="stCaptionContainer"]', has_text="tokens/s")
        speed.first.wait_for(timeout=120_000)
        assert messages.count() == 2
        assert "What is MiniMind?" in messages.nth(0).inner_text()
        answer = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text()
        speed_text = speed.first.inner_text()
        background = page.get_by_test_id("stApp").evaluate("e => getComputedStyle(e).backgroundColor")
        page.screenshot(path=str(tmp_path / "streamlit_chat.png"), full_page=True)
    assert (tmp_path / "streamlit_chat.png").stat().st_size > 0
    assert answer.strip() and "tokens/s" not in answer  # the streamed answer itself, not just its speed line
    assert int(speed_text.split()[0]) >= 1
    assert _luminance(background) < 0.3, background


def test_gradio_in_chromium_greedy_answer_matches_engine(tmp_path, browser):
    """Gradio on a tiny real model, temperature 0 and 6 max tokens set in the page: the answer shown is what the
    engine alone gives for the chat-template prompt (not through the web backend). Dark theme in a light browser."""
    from minimind.engine import SamplingParams
    from minimind.text.template import render_prompt, stop_token_ids
    from minimind.web.backend import EngineBackend

    tok = tokenizer_dir("minimind2")
    backend = EngineBackend(str(save_tiny_model(tmp_path)), tokenizer=str(tok), max_model_len=512, max_num_seqs=1)
    try:
        question = "What is MiniMind?"
        with gradio_app(backend, theme="dark") as url:
            page = browser.new_page(color_scheme="light")
            _ask_gradio(page, url, question, themed=True, Temperature=0, **{"Max tokens": 6})
            page.get_by_text("tokens/s").first.wait_for(timeout=120_000)
            bot = page.get_by_test_id("bot")
            answer = bot.first.locator(".message-content").inner_text()
            speed = page.get_by_text(re.compile(r"^\d+ tokens · [\d.]+ tokens/s$")).first.inner_text()
            background = page.locator("gradio-app").evaluate("e => getComputedStyle(e).backgroundColor")
            page.screenshot(path=str(tmp_path / "gradio_chat.png"), full_page=True)
        llm = backend.llm
        prompt = render_prompt(llm.tokenizer, [{"role": "user", "content": question}], open_thinking=None)
        direct = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6,
                                                     stop_token_ids=sorted(stop_token_ids(llm.tokenizer, llm.config))))
    finally:
        backend.close()
    expected = direct[0].outputs[0]
    assert (tmp_path / "gradio_chat.png").stat().st_size > 0
    assert answer.split() == expected.text.split() and answer.strip()
    assert int(speed.split()[0]) == len(expected.token_ids)  # 6 tokens unless the model stopped: the slider got there
    assert _luminance(background) < 0.3, background


# ---------------------------------------------------------------- HTML in model output
def _assert_html_shown_as_text(page, answer_locator):
    assert page.evaluate("typeof window.__pwned") == "undefined"  # neither the <script> nor onerror ran
    assert answer_locator.locator("script, img").count() == 0  # not elements at all: text
    text = " ".join(answer_locator.inner_text().split())
    assert "<script>window.__pwned=1</script>" in text, text
    assert '<img src=x onerror="window.__pwned=1">' in text, text


def test_html_in_answer_is_text_streamlit(tmp_path, browser):
    """Scripted backend (a random model cannot write HTML): the answer carries a <script> and an onerror image.
    Light theme in a dark browser."""
    spec = {"kind": "scripted", "chunks": [XSS_ANSWER]}
    with streamlit_app(["--theme", "light"], spec, tmp_path) as url:
        page = browser.new_page(color_scheme="dark")
        messages = _ask_streamlit(page, url, "show me HTML")
        page.locator('[data-testid="stChatMessage"] [data-testid="stCaptionContainer"]',
                     has_text="tokens/s").first.wait_for(timeout=60_000)
        _assert_html_shown_as_text(page, messages.nth(1))
        background = page.get_by_test_id("stApp").evaluate("e => getComputedStyle(e).backgroundColor")
        page.screenshot(path=str(tmp_path / "streamlit_html.png"), full_page=True)
    assert _luminance(background) > 0.7, background


def test_html_in_answer_is_text_gradio(tmp_path, browser):
    """As above, for Gradio (light theme in a dark browser)."""
    with gradio_app(ScriptedBackend([XSS_ANSWER]), theme="light") as url:
        page = browser.new_page(color_scheme="dark")
        _ask_gradio(page, url, "show me HTML", themed=True)
        page.get_by_text("tokens/s").first.wait_for(timeout=60_000)
        _assert_html_shown_as_text(page, page.get_by_test_id("bot").first)
        background = page.locator("gradio-app").evaluate("e => getComputedStyle(e).backgroundColor")
        page.screenshot(path=str(tmp_path / "gradio_html.png"), full_page=True)
    assert _luminance(background) > 0.7, background


# ---------------------------------------------------------------- the stop button
FREED = {"finish_reasons": ["abort"], "unfinished": False, "free_slots": 1, "slots": 1}


def test_stop_button_aborts_engine_request_streamlit(tmp_path, browser):
    """Chinese UI. HoldingBackend (web_helpers): the real engine, whose request can only end by an abort. After
    Stop the engine reports the abort, no unfinished request and its slot free; the partial answer is kept."""
    from minimind.web.text import TEXT

    t = TEXT["zh"]
    report = tmp_path / "ended.jsonl"
    spec = {"kind": "holding", "model": str(save_tiny_model(tmp_path)), "tokenizer": str(tokenizer_dir("minimind2")),
            "report": str(report), "max_model_len": 512, "max_num_seqs": 1}
    with streamlit_app(["--lang", "zh"], spec, tmp_path) as url:
        page = browser.new_page()
        messages = _ask_streamlit(page, url, "你好")
        stop = messages.get_by_role("button", name=t["stop"])
        stop.wait_for(timeout=120_000)
        stop.click()
        page.get_by_text(t["stopped"], exact=True).wait_for(timeout=60_000)
        # the rerun draws the history (with the "stopped" note) first and drops the previous run's Stop button
        # when it ends: wait for that, not a snapshot taken in between
        stop.wait_for(state="detached", timeout=30_000)
        assert messages.count() == 2
        page.screenshot(path=str(tmp_path / "streamlit_stopped.png"), full_page=True)
    lines = report.read_text().splitlines() if report.exists() else []
    assert [json.loads(line) for line in lines] == [FREED]


def test_stop_button_aborts_engine_request_gradio(tmp_path, browser):
    """Chinese UI; as above for Gradio's stop button."""
    from minimind.web.text import TEXT

    t = TEXT["zh"]
    backend = HoldingBackend(str(save_tiny_model(tmp_path)), str(tokenizer_dir("minimind2")), max_model_len=512,
                             max_num_seqs=1)
    with gradio_app(backend, lang="zh") as url:
        page = browser.new_page()
        _ask_gradio(page, url, "你好", placeholder=t["ask"])
        stop = page.get_by_role("button", name=t["stop"])
        stop.wait_for(timeout=60_000)
        stop.click()
        ended = backend.ended.get(timeout=60)
        stop.wait_for(state="hidden", timeout=30_000)
        page.get_by_test_id("submit-button").wait_for(timeout=30_000)  # ready for the next question
        assert page.get_by_text("tokens/s").count() == 0  # the answer did not run to its end
        page.screenshot(path=str(tmp_path / "gradio_stopped.png"), full_page=True)
    assert ended == FREED
