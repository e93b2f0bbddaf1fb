"""Gradio chat UI: a ChatInterface over the shared backend. Never share=True unless asked (`--share`).

Answers are HTML-escaped outside code (escape_html) before Gradio renders the markdown, so a `<script>` in model
output is shown as text. Reasoning and the tokens/s line are metadata messages (collapsed, never sent back).
"""
from __future__ import annotations

import html

from .backend import Backend, Settings, build_messages, chat_stream, escape_html


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
    """Gradio's chat history -> plain user/assistant messages (metadata messages dropped, escaping undone)."""
    out = []
    for m in history or []:
        if not isinstance(m, dict) or (m.get("metadata") or {}).get("title"):
            continue
        text = _text(m.get("content"))
        if text is None or m.get("role") not in ("user", "assistant"):
            continue
        out.append({"role": m["role"], "content": html.unescape(text) if m["role"] == "assistant" else text})
    return out


def make_chat_fn(backend: Backend):
    def chat(message, history, system="", turns=2, temperature=0.85, top_p=0.85, max_tokens=512, model=None):
        question = _text(message) or ""
        settings = Settings(system=system or "", history_turns=int(turns), temperature=float(temperature),
                            top_p=float(top_p), max_tokens=int(max_tokens), model=model or None)
        messages = build_messages(history_from_gradio(history), question, settings)
        for reply in chat_stream(backend, messages, settings):
            out = []
            if reply.reasoning:
                out.append({"role": "assistant", "content": escape_html(reply.reasoning),
                            "metadata": {"title": "Reasoning", "status": "done" if reply.done else "pending"}})
            for call in reply.tool_calls:
                out.append({"role": "assistant", "content": escape_html(f"`{call['name']}({call['arguments']})`"),
                            "metadata": {"title": f"Tool call: {call['name']}", "status": "done"}})
            out.append({"role": "assistant", "content": escape_html(reply.content)})
            if reply.done:
                out.append({"role": "assistant", "content": "", "metadata": {"title": reply.speed_text()}})
            yield out

    return chat


def build_app(backend: Backend):
    import gradio as gr

    models = backend.models()
    inputs = [
        gr.Textbox(label="System prompt", lines=2),
        gr.Slider(0, 10, value=2, step=1, label="History turns"),
        gr.Slider(0.0, 2.0, value=0.85, step=0.05, label="Temperature"),
        gr.Slider(0.05, 1.0, value=0.85, step=0.05, label="Top p"),
        gr.Slider(1, 4096, value=512, step=1, label="Max tokens"),
    ]
    if len(models) > 1:
        inputs.append(gr.Dropdown(models, value=models[0], label="Model / LoRA"))
    chatbot = gr.Chatbot(label="MiniMind", sanitize_html=True, render_markdown=True, allow_tags=False)
    return gr.ChatInterface(make_chat_fn(backend), chatbot=chatbot, additional_inputs=inputs, title="💬 MiniMind",
                            additional_inputs_accordion=gr.Accordion("Settings", open=False), api_name="chat",
                            flagging_mode="never")


def launch(backend: Backend, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Serve the UI (blocks unless prevent_thread_lock=True); returns the Blocks (call .close() to stop)."""
    demo = build_app(backend)
    demo.queue().launch(server_name=host, server_port=port, share=bool(share), **kwargs)
    return demo
