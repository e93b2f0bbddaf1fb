"""Gradio chat UI: a ChatInterface over the shared backend; share=True only when asked (`--share`).

Answers are HTML-escaped outside code before Gradio renders the markdown, so a `<script>` in model output shows as
text. Reasoning and the tokens/s line are metadata messages (collapsed, never sent back). The stop button cancels
the event; Gradio then closes the chat generator, which closes the backend stream (the engine aborts the request).
"""
from __future__ import annotations

import html
import signal
import threading
import time
from contextlib import closing, contextmanager

from .backend import SLIDERS, Backend, Settings, build_messages, chat_stream, escape_html
from .text import TEXT


def _text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 may send [{"type": "text", "text": ...}]
        parts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type", "text") == "text"]
        return "".join(parts) if len(parts) == len(content) else None
    if isinstance(content, dict) and "text" in content:
        return content["text"]
    return None


def history_from_gradio(history: list) -> list[dict]:
    """Gradio's chat history -> plain messages (metadata messages dropped, escaping undone); build_messages skips
    other roles and non-text content."""
    out = []
    for m in history or []:
        if isinstance(m, dict) and not (m.get("metadata") or {}).get("title"):
            text, role = _text(m.get("content")), m.get("role")
            out.append({"role": role, "content": html.unescape(text) if role == "assistant" and text else text})
    return out


def make_chat_fn(backend: Backend, lang: str = "en"):
    t = TEXT[lang]

    def chat(message, history, system="", *values):  # values: the sliders in SLIDERS order, then the model
        settings = Settings(system=system or "", **dict(zip([*SLIDERS, "model"], values)))
        messages = build_messages(history_from_gradio(history), _text(message) or "", settings)
        with closing(chat_stream(backend, messages, settings)) as replies:  # closed on stop
            for reply in replies:
                yield _messages(reply, t)

    return chat


def _messages(reply, t: dict) -> list[dict]:
    out = []
    if reply.reasoning:
        out.append({"role": "assistant", "content": escape_html(reply.reasoning),
                    "metadata": {"title": t["reasoning"], "status": "done" if reply.done else "pending"}})
    for call in reply.tool_calls:
        out.append({"role": "assistant", "content": escape_html(f"`{call['name']}({call['arguments']})`"),
                    "metadata": {"title": f"{t['tools']}: {call['name']}", "status": "done"}})
    out.append({"role": "assistant", "content": escape_html(reply.content)})
    if reply.done:
        out.append({"role": "assistant", "content": "", "metadata": {"title": reply.speed_text()}})
    return out


def build_app(backend: Backend, lang: str = "en"):
    import gradio as gr

    if lang not in TEXT:
        raise ValueError(f"unknown UI language {lang!r}; choose from {', '.join(TEXT)}")
    t = TEXT[lang]
    models, defaults = backend.models(), backend.defaults()
    inputs = [gr.Textbox(label=t["system"], lines=2)]
    inputs += [gr.Slider(low, high, value=getattr(defaults, field), step=step, label=t[key])
               for field, (key, low, high, step) in SLIDERS.items()]
    if len(models) > 1:
        inputs.append(gr.Dropdown(models, value=models[0], label=t["model"]))
    chatbot = gr.Chatbot(label="MiniMind", sanitize_html=True, render_markdown=True, allow_tags=False)
    textbox = gr.Textbox(placeholder=t["ask"], show_label=False, label="", scale=7, autofocus=True, submit_btn=True,
                         stop_btn=t["stop"])
    return gr.ChatInterface(make_chat_fn(backend, lang), chatbot=chatbot, additional_inputs=inputs, textbox=textbox,
                            title="💬 MiniMind", description=t["pretrain"] if backend.pretrain else None,
                            additional_inputs_accordion=gr.Accordion(t["settings"], open=False), api_name="chat",
                            flagging_mode="never")


def theme_js(theme: str) -> str | None:
    """Page-load JS forcing dark or light mode; None for "auto" (the browser decides). Gradio reads the mode from
    `?__theme=`: it is added and the page reloaded once."""
    if theme == "auto":
        return None
    if theme not in ("dark", "light"):
        raise ValueError(f"unknown theme {theme!r}; choose from auto, dark, light")
    return ("() => { const url = new URL(window.location.href);"
            f" if (!url.searchParams.has('__theme')) {{ url.searchParams.set('__theme', '{theme}');"
            " window.location.replace(url.href); } }")


def launch(backend: Backend, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           lang: str = "en", theme: str = "auto", prevent_thread_lock: bool = False, **kwargs):
    """Serve the UI; returns the Blocks. Unless prevent_thread_lock=True, blocks until SIGTERM or SIGINT (Ctrl-C)
    and then closes the server (its port, its queue): the process can then exit normally, which also runs Gradio's
    exit hooks (a --share tunnel is a child process they stop)."""
    demo = build_app(backend, lang).queue()
    options = dict(server_name=host, server_port=port, share=bool(share), js=theme_js(theme), **kwargs)
    if prevent_thread_lock:
        demo.launch(prevent_thread_lock=True, **options)
        return demo
    with _stop_signals() as received:
        demo.launch(prevent_thread_lock=True, **options)
        while not received:
            time.sleep(0.1)
    demo.close()  # with the usual handlers back: a second Ctrl-C interrupts a slow close
    return demo


@contextmanager
def _stop_signals():
    """SIGTERM and SIGINT append to the yielded list instead of interrupting the main thread wherever it is (in
    Gradio's own startup, say); outside the main thread signals cannot be caught, and the list stays empty."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
