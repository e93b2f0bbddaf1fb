"""Streamlit chat UI: `minimind web` (or `streamlit run` this file with MINIMIND_WEB_CONFIG set).

Model output is rendered with st.markdown without unsafe_allow_html, so HTML in an answer is shown as text.
"""
from __future__ import annotations

import streamlit as st

from minimind.web.backend import BackendConfig, Settings, build_messages, chat_stream, make_backend

TEXT = {
    "English": {"model": "Model / LoRA", "system": "System prompt", "turns": "History turns", "temperature": "Temperature",
                "top_p": "Top p", "max_tokens": "Max tokens", "clear": "Clear chat", "ask": "Ask something",
                "reasoning": "Reasoning", "tools": "Tool calls", "loading": "Loading the model ..."},
    "中文": {"model": "模型 / LoRA", "system": "系统提示词", "turns": "历史对话轮数", "temperature": "温度",
             "top_p": "Top p", "max_tokens": "最大生成长度", "clear": "清空对话", "ask": "请输入问题",
             "reasoning": "思考过程", "tools": "工具调用", "loading": "正在加载模型 ..."},
}


@st.cache_resource(show_spinner="Loading the model / 正在加载模型 ...")
def _shared_backend(config_json: str):
    import json

    return make_backend(BackendConfig(**json.loads(config_json)))


def get_backend():
    """The backend of this process (session_state["backend"] wins: for embedding the app and for tests)."""
    if "backend" in st.session_state:
        return st.session_state["backend"]
    return _shared_backend(BackendConfig.from_env().to_env())


def render_reply(reply, t: dict) -> None:
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
    st.session_state.setdefault("history", [])  # [{"role", "content", "reply"?}]
    with st.sidebar:
        st.header("MiniMind")
        t = TEXT[st.radio("Language / 语言", list(TEXT), horizontal=True, key="lang")]
    backend = get_backend()

    with st.sidebar:
        models = backend.models()
        model = st.selectbox(t["model"], models, key="model") if len(models) > 1 else None
        system = st.text_area(t["system"], key="system", value="")
        turns = st.slider(t["turns"], 0, 10, 2, key="turns")
        temperature = st.slider(t["temperature"], 0.0, 2.0, 0.85, 0.05, key="temperature")
        top_p = st.slider(t["top_p"], 0.05, 1.0, 0.85, 0.05, key="top_p")
        max_tokens = st.slider(t["max_tokens"], 1, 4096, 512, key="max_tokens")
        if st.button(t["clear"], key="clear"):
            st.session_state["history"] = []

    st.title("💬 MiniMind")
    for m in st.session_state["history"]:
        with st.chat_message(m["role"]):
            if m["role"] == "assistant" and m.get("reply") is not None:
                render_reply(m["reply"], t)
            else:
                st.markdown(m["content"])

    question = st.chat_input(t["ask"])
    if not question:
        return
    settings = Settings(system=system, history_turns=turns, temperature=temperature, top_p=top_p,
                        max_tokens=max_tokens, model=model)
    messages = build_messages(st.session_state["history"], question, settings)
    with st.chat_message("user"):
        st.markdown(question)
    st.session_state["history"].append({"role": "user", "content": question})
    reply = None
    with st.chat_message("assistant"):
        box = st.empty()
        for reply in chat_stream(backend, messages, settings):
            with box.container():
                render_reply(reply, t)
    st.session_state["history"].append({"role": "assistant", "content": reply.content, "reply": reply})


main()
