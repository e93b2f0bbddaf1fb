"""Streamlit chat UI: `minimind web` (or `streamlit run` this file with MINIMIND_WEB_CONFIG set).

Model output is rendered with st.markdown without unsafe_allow_html, so HTML in an answer is shown as text.
"""
from __future__ import annotations

from contextlib import closing

import streamlit as st

from minimind.web.backend import SLIDERS, BackendConfig, Reply, Settings, build_messages, chat_stream, make_backend
from minimind.web.text import LANG_NAMES, TEXT, default_lang


@st.cache_resource(show_spinner="Loading the model / 正在加载模型 ...")
def _shared_backend():
    return make_backend(BackendConfig.from_env())


def get_backend():  # session_state["backend"] wins: for embedding the app and for tests
    return st.session_state["backend"] if "backend" in st.session_state else _shared_backend()


def render_reply(reply: Reply, t: dict) -> None:
    if reply.reasoning:
        with st.expander(t["reasoning"], expanded=False):
            st.markdown(reply.reasoning)
    if reply.tool_calls:
        with st.expander(f"{t['tools']} ({len(reply.tool_calls)})", expanded=False):
            st.json(reply.tool_calls)
    st.markdown(reply.content)
    if reply.done:
        st.caption(reply.speed_text())


def main() -> None:
    st.set_page_config(page_title="MiniMind chat", page_icon="💬")
    st.session_state.setdefault("history", [])  # [{"role", "content", "reply" (assistant)}]
    with st.sidebar:
        st.header("MiniMind")
        langs = list(TEXT)
        t = TEXT[st.radio("Language / 语言", langs, index=langs.index(default_lang()), format_func=LANG_NAMES.get,
                          horizontal=True, key="lang")]
    backend = get_backend()

    with st.sidebar:
        if backend.pretrain:
            st.info(t["pretrain"])
        models = backend.models()
        model = st.selectbox(t["model"], models, key="model") if len(models) > 1 else None
        system = st.text_area(t["system"], key="system", value="")
        defaults = backend.defaults()
        sliders = {field: st.slider(t[key], low, high, getattr(defaults, field), step, key=key)
                   for field, (key, low, high, step) in SLIDERS.items()}
        if st.button(t["clear"], key="clear"):
            st.session_state["history"] = []

    st.title("💬 MiniMind")
    for m in st.session_state["history"]:
        with st.chat_message(m["role"]):
            if m["role"] == "assistant" and m.get("reply") is not None:
                render_reply(m["reply"], t)
                if not m["reply"].done:
                    st.caption(t["stopped"])
            else:
                st.markdown(m["content"])

    question = st.chat_input(t["ask"])
    if not question:
        return
    settings = Settings(system=system, model=model, **sliders)
    messages = build_messages(st.session_state["history"], question, settings)
    with st.chat_message("user"):
        st.markdown(question)
    # Clicking Stop (any widget) reruns the script, interrupting this one mid-answer with an exception at its next
    # st call. So the answer is in the history before it streams and grows there, and closing() closes the stream
    # at once: the in-process engine aborts the request and frees its slot.
    entry = {"role": "assistant", "content": "", "reply": Reply()}
    st.session_state["history"] += [{"role": "user", "content": question}, entry]
    with st.chat_message("assistant"):
        box = st.empty()
        stop = st.empty()
        stop.button(t["stop"], key="stop", icon=":material/stop_circle:")
        with closing(chat_stream(backend, messages, settings)) as replies:
            for reply in replies:
                entry.update(content=reply.content, reply=reply)
                with box.container():
                    render_reply(reply, t)
        stop.empty()


main()
