"""`minimind web`: the shared backend, the Streamlit app (AppTest, headless) and the Gradio app (direct + client)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import tokenizer_dir
from minimind.web.backend import BackendConfig, EngineBackend, Settings, build_messages, chat_stream, escape_html
from web_helpers import ScriptedBackend, SpyBackend, save_tiny_model

APP = Path(__file__).resolve().parents[1] / "src" / "minimind" / "web" / "streamlit_app.py"
SPEED = re.compile(r"^(\d+) tokens · [\d.]+ tokens/s$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tokenizer_dir("minimind2")
    return save_tiny_model(tmp_path_factory.mktemp("web")), tok


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    backend = EngineBackend(str(model), tokenizer=str(tok), max_model_len=512, max_num_seqs=2)
    yield backend
    backend.close()


# ---------------------------------------------------------------- backend
def test_build_messages_keeps_last_turns_and_system():
    history = []
    for i in range(4):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    msgs = build_messages(history, "new", Settings(system="be brief", history_turns=2))
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"},
                    {"role": "assistant", "content": "a3"}, {"role": "user", "content": "new"}]
    assert build_messages(history, "new", Settings(history_turns=0)) == [{"role": "user", "content": "new"}]
    assert len(build_messages(history, "x", Settings(history_turns=10))) == 9


def test_chat_stream_splits_reasoning_and_counts_tokens():
    replies = list(chat_stream(ScriptedBackend(), [{"role": "user", "content": "hi"}], Settings()))
    assert replies[0].reasoning == "let me think" and replies[0].content == ""
    last = replies[-1]
    assert last.done and last.reasoning == "let me think" and last.content.startswith("Hello <script>")
    assert last.tokens == 3 and SPEED.match(last.speed_text())


def test_tool_calls_parsed():
    chunks = ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    last = list(chat_stream(ScriptedBackend(chunks), [], Settings()))[-1]
    assert last.tool_calls == [{"name": "get_time", "arguments": "{}"}] and last.content == ""


def test_escape_html_outside_code_only():
    assert escape_html("a <script>x</script> `<b>` ```\n<i>\n```") == "a &lt;script&gt;x&lt;/script&gt; `<b>` ```\n<i>\n```"


def test_engine_backend_streams_and_respects_max_tokens(engine):
    replies = list(chat_stream(engine, [{"role": "user", "content": "你好"}],
                               Settings(max_tokens=4, temperature=0.0)))
    assert len(replies) >= 2 and replies[-1].done
    assert 1 <= replies[-1].tokens <= 4
    again = list(chat_stream(engine, [{"role": "user", "content": "你好"}], Settings(max_tokens=4, temperature=0.0)))
    assert again[-1].content == replies[-1].content  # greedy: temperature 0 reached the sampler


# ---------------------------------------------------------------- Streamlit (AppTest)
def _app(backend):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["backend"] = backend
    return at.run()


def _ask(at, text):
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def test_streamlit_conversation_real_engine_history_trimmed_and_sliders(engine):
    spy = SpyBackend(engine)
    at = _app(spy)
    at.slider(key="turns").set_value(1)
    at.slider(key="temperature").set_value(0.0)
    at.slider(key="top_p").set_value(0.5)
    at.slider(key="max_tokens").set_value(6)
    at.text_area(key="system").set_value("You are MiniMind.")
    for q in ("first question", "second question", "third question"):
        _ask(at, q)
    assert len(at.chat_message) == 6
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 3
    messages, settings = spy.calls[-1]
    assert (settings.temperature, settings.top_p, settings.max_tokens, settings.history_turns) == (0.0, 0.5, 6, 1)
    # only the last turn is kept, behind the system prompt
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "You are MiniMind." and messages[1]["content"] == "second question"
    assert messages[-1]["content"] == "third question"
    history = at.session_state["history"]
    assert messages[2]["content"] == history[3]["content"]  # the answer as the model wrote it
    captions = [c.value for c in at.caption]
    assert len(captions) == 3 and all(SPEED.match(c) and 1 <= int(SPEED.match(c).group(1)) <= 6 for c in captions)
    # greedy answer shown equals the engine's own answer to the same messages
    direct = list(chat_stream(engine, messages, settings))[-1]
    assert history[-1]["content"] == direct.content


def test_streamlit_reasoning_collapsed_html_as_text_and_clear():
    """Scripted backend: needs known text with a think block and a <script> (random weights give neither)."""
    backend = ScriptedBackend()
    at = _ask(_app(backend), "hi")
    assert len(at.expander) == 1 and at.expander[0].label == "Reasoning"
    assert at.expander[0].proto.expanded is False
    assert at.expander[0].markdown[0].value == "let me think"
    answer = at.chat_message[1].markdown[-1]
    assert answer.value.startswith("Hello <script>window.pwned=1</script>")
    assert all(m.allow_html is False for m in at.markdown)  # never unsafe_allow_html
    assert SPEED.match(at.chat_message[1].caption[0].value)
    at.button(key="clear").click().run()
    assert len(at.chat_message) == 0 and at.session_state["history"] == []


def test_streamlit_model_picker_reaches_backend():
    backend = ScriptedBackend(chunks=["ok"], models=["minimind", "minimind-lora_identity"])
    at = _app(backend)
    at.selectbox(key="model").set_value("minimind-lora_identity")
    _ask(at, "hi")
    assert backend.calls[-1][1].model == "minimind-lora_identity"


# ---------------------------------------------------------------- Gradio
def test_gradio_chat_fn_direct():
    from minimind.web.gradio_app import make_chat_fn

    backend = ScriptedBackend()
    chat = make_chat_fn(backend)
    history = [{"role": "user", "content": "q0"},
               {"role": "assistant", "content": "r", "metadata": {"title": "Reasoning"}},
               {"role": "assistant", "content": [{"type": "text", "text": "a &lt;b&gt;"}]},
               {"role": "assistant", "content": "", "metadata": {"title": "3 tokens · 1.0 tokens/s"}}]
    outs = list(chat("q1", history, "sys", 1, 0.3, 0.6, 9))
    final = outs[-1]
    assert final[0] == {"role": "assistant", "content": "let me think",
                        "metadata": {"title": "Reasoning", "status": "done"}}
    assert final[1]["content"] == "Hello &lt;script&gt;window.pwned=1&lt;/script&gt; **bold**"
    assert SPEED.match(final[2]["metadata"]["title"])
    messages, settings = backend.calls[-1]
    assert messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q0"},
                        {"role": "assistant", "content": "a <b>"}, {"role": "user", "content": "q1"}]
    assert (settings.history_turns, settings.temperature, settings.top_p, settings.max_tokens) == (1, 0.3, 0.6, 9)
    assert outs[0][0]["metadata"]["status"] == "pending"


def test_gradio_client_against_launched_app(engine):
    from gradio_client import Client

    from minimind.web.gradio_app import launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    spy = SpyBackend(engine)
    demo = launch(spy, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:") and demo.share_url is None
        client = Client(demo.local_url, verbose=False)
        result = client.predict("你好", "", 2, 0.0, 0.9, 5, api_name="/chat")
        answer = [m for m in result if not (m.get("metadata") or {}).get("title")]
        assert len(answer) == 1 and answer[0]["role"] == "assistant"
        speed = [m for m in result if SPEED.match((m.get("metadata") or {}).get("title") or "")]
        assert len(speed) == 1 and 1 <= int(SPEED.match(speed[0]["metadata"]["title"]).group(1)) <= 5
        direct = list(chat_stream(engine, [{"role": "user", "content": "你好"}],
                                  Settings(temperature=0.0, top_p=0.9, max_tokens=5)))[-1]
        assert answer[0]["content"] == escape_html(direct.content)
        assert spy.calls[-1][1].max_tokens == 5
    finally:
        demo.close()


# ---------------------------------------------------------------- CLI
def test_cli_gradio_never_shares_unless_asked(monkeypatch, tiny):
    import minimind.web.backend as backend_mod
    from minimind.apps.web import main
    from minimind.web import gradio_app

    seen = []
    monkeypatch.setattr(backend_mod, "make_backend", lambda config: config)
    monkeypatch.setattr(BackendConfig, "close", lambda self: None, raising=False)  # main closes its backend
    monkeypatch.setattr(gradio_app, "launch", lambda backend, **kw: seen.append((backend, kw)))
    model, tok = tiny
    assert main(["--ui", "gradio", "--model", str(model), "--tokenizer", str(tok)]) == 0
    assert main(["--ui", "gradio", "--api-base", "http://127.0.0.1:9/v1", "--share", "--port", "7999"]) == 0
    (cfg, kw), (cfg2, kw2) = seen
    assert kw == {"host": "127.0.0.1", "port": 7860, "share": False, "lang": "en", "theme": "auto"}
    assert cfg == BackendConfig(model=str(model), tokenizer=str(tok))
    assert kw2 == {"host": "127.0.0.1", "port": 7999, "share": True, "lang": "en", "theme": "auto"}
    assert cfg2.api_base == "http://127.0.0.1:9/v1"
    assert main(["--ui", "gradio", "--api-base", "http://x/v1", "--lang", "zh", "--theme", "dark"]) == 0
    assert seen[-1][1]["lang"] == "zh" and seen[-1][1]["theme"] == "dark"
    assert main(["--share"]) == 2  # --share is Gradio only


def test_cli_streamlit_command_binds_localhost(monkeypatch, tiny):
    from minimind.apps.web import main

    calls = []
    def execve(path, cmd, env):  # the real one never returns: this process would become Streamlit
        calls.append((cmd, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    model, tok = tiny
    for flags in (["--port", "8600"], ["--theme", "dark", "--lang", "zh"]):
        with pytest.raises(SystemExit):
            main(["--model", str(model), "--tokenizer", str(tok), *flags])
    (cmd, env), (cmd2, env2) = calls
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("streamlit_app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "8600"
    import json

    assert json.loads(env["MINIMIND_WEB_CONFIG"])["model"] == str(model)  # the config travels in the environment
    assert "--theme.base" not in cmd and env["MINIMIND_WEB_LANG"] == "en"  # auto: the browser decides
    assert cmd2[cmd2.index("--theme.base") + 1] == "dark" and env2["MINIMIND_WEB_LANG"] == "zh"


# ---------------------------------------------------------------- --api-base mode against a real `minimind serve`
def test_openai_backend_against_minimind_serve(tiny, engine):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from minimind.engine import LLM
    from minimind.serve import create_app
    from minimind.web.backend import OpenAIBackend
    from test_serve import serve

    model, tok = tiny
    engines = {name: LLM(str(model), tokenizer=str(tok), max_model_len=512, max_num_seqs=2)
               for name in ("tiny", "tiny-lora")}
    with serve(create_app(engines)) as url:
        backend = OpenAIBackend(url + "/v1", api_key="unused")
        assert backend.models() == ["tiny", "tiny-lora"]
        settings = Settings(temperature=0.0, max_tokens=5, model="tiny-lora")
        msgs = [{"role": "user", "content": "你好"}]
        replies = list(chat_stream(backend, msgs, settings))
        local = list(chat_stream(engine, msgs, settings))[-1]
        assert replies[-1].done and replies[-1].content == local.content
        assert replies[-1].tokens == local.tokens  # the usage chunk gives the exact count
        at = _app(backend)  # the Streamlit picker lists the server's models
        assert at.selectbox(key="model").options == ["tiny", "tiny-lora"]


def test_streamlit_chinese_ui_text(monkeypatch):
    at = _app(ScriptedBackend())
    assert at.radio(key="lang").value == "en" and at.slider(key="turns").label == "History turns"
    at.radio(key="lang").set_value("zh").run()
    assert at.slider(key="turns").label == "历史对话轮数" and at.button(key="clear").label == "清空对话"
    _ask(at, "你好")
    assert at.expander[0].label == "思考过程"
    monkeypatch.setenv("MINIMIND_WEB_LANG", "zh")  # `minimind web --lang zh` makes Chinese the default
    at = _app(ScriptedBackend())
    assert at.radio(key="lang").value == "zh" and at.slider(key="max_tokens").label == "最大生成长度"


def _labels(demo) -> set[str]:
    return {str(getattr(b, "label", None)) for b in demo.blocks.values()} | {
        str(getattr(b, "placeholder", None)) for b in demo.blocks.values()}


def test_gradio_labels_follow_lang():
    from minimind.web.gradio_app import build_app, make_chat_fn
    from minimind.web.text import TEXT

    zh, en = _labels(build_app(ScriptedBackend(), "zh")), _labels(build_app(ScriptedBackend(), "en"))
    for key in ("system", "turns", "temperature", "max_tokens", "settings", "ask"):
        assert TEXT["zh"][key] in zh and TEXT["zh"][key] not in en, key
        assert TEXT["en"][key] in en, key
    final = list(make_chat_fn(ScriptedBackend(), "zh")("q", []))[-1]
    assert final[0]["metadata"]["title"] == "思考过程"
    with pytest.raises(ValueError, match="choose from en, zh"):
        build_app(ScriptedBackend(), "fr")


def test_pretrain_note_in_both_uis():
    """With pretrain weights system prompt and history are not used: both UIs say so (and only then)."""
    from minimind.web.gradio_app import build_app
    from minimind.web.text import TEXT

    pretrain = ScriptedBackend()
    pretrain.pretrain = True
    assert [i.value for i in _app(pretrain).info] == [TEXT["en"]["pretrain"]]
    assert len(_app(ScriptedBackend()).info) == 0
    assert build_app(pretrain, "zh").description == TEXT["zh"]["pretrain"]
    assert build_app(ScriptedBackend()).description is None


# ---------------------------------------------------------------- flags shared with `minimind chat`
def test_cli_open_thinking_dtype_and_pretrain_reach_config(monkeypatch, tiny, tmp_path, capsys):
    import shutil

    import minimind.web.backend as backend_mod
    from minimind.apps.web import build_parser, main
    from minimind.web import gradio_app

    seen = []
    monkeypatch.setattr(backend_mod, "make_backend", lambda config: config)
    monkeypatch.setattr(BackendConfig, "close", lambda self: None, raising=False)  # main closes its backend
    monkeypatch.setattr(gradio_app, "launch", lambda backend, **kw: seen.append(backend))
    model, tok = tiny
    pretrain = tmp_path / "pretrain_64.pth"
    shutil.copy(model, pretrain)
    base = ["--ui", "gradio", "--tokenizer", str(tok)]
    assert main([*base, "--model", str(model), "--open_thinking", "--dtype", "bfloat16"]) == 0
    assert main([*base, "--model", str(pretrain), "--open_thinking", "0"]) == 0
    assert main([*base, "--save_dir", str(tmp_path), "--load_from", str(tok), "--weight", "pretrain"]) == 0
    sft, pre, seed_layout = seen
    assert (sft.open_thinking, sft.dtype, sft.pretrain) == (True, "bfloat16", False)
    assert (pre.open_thinking, pre.dtype, pre.pretrain) == (False, None, True)
    assert seed_layout.pretrain and seed_layout.model == str(pretrain)  # the original --weight pretrain layout
    assert main(["--ui", "gradio", "--api-base", "http://x/v1", "--open_thinking"]) == 0
    assert seen[-1].open_thinking is True and seen[-1].api_base == "http://x/v1"
    assert main(["--api-base", "http://x/v1", "--dtype", "float32"]) == 1
    assert "--dtype applies to a local model" in capsys.readouterr().err
    text = build_parser().format_help()
    for flag in ("--open_thinking", "--dtype", "--lang", "--theme"):
        assert flag in text


def test_cli_unusable_model_is_one_clear_line(tiny, tmp_path, monkeypatch, capsys):
    from minimind.cli import main

    monkeypatch.chdir(tmp_path)  # no `model/` tokenizer folder of the original layout to fall back on
    assert main(["web", "--ui", "gradio", "--model", str(tiny[0])]) == 2  # a file problem, as in every command
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tokenizer" in err and len(err.strip().splitlines()) == 1


def test_engine_backend_open_thinking_and_dtype(tiny):
    """minimind-3's template reads open_thinking: the prompt opens a <think> block, and the reply is reasoning."""
    import torch

    from minimind.text.template import render_prompt
    from minimind.web.backend import make_backend

    model, _ = tiny
    tok = tokenizer_dir("minimind-3")
    backend = make_backend(BackendConfig(model=str(model), tokenizer=str(tok), dtype="bfloat16", open_thinking=True))
    try:
        assert backend.llm.dtype == torch.bfloat16 and backend.starts_in_think
        msgs = [{"role": "user", "content": "hi"}]
        assert backend.prompt(msgs) == render_prompt(backend.llm.tokenizer, msgs, open_thinking=True)
        assert backend.prompt(msgs).endswith("<think>\n")
        last = list(chat_stream(backend, msgs, Settings(max_tokens=4, temperature=0.0)))[-1]
        assert last.reasoning and not last.content  # no </think> in 4 random tokens: all of it is reasoning
    finally:
        backend.close()


def test_engine_backend_pretrain_prompt_is_bos_plus_question(tiny):
    """Pretrain weights (as `minimind chat`): bos + the question; system prompt and history are not sent."""
    from minimind.engine import SamplingParams
    from minimind.web.backend import make_backend

    model, tok = tiny
    backend = make_backend(BackendConfig(model=str(model), tokenizer=str(tok), pretrain=True))
    try:
        llm = backend.llm
        msgs = build_messages([{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
                              "Once upon a time", Settings(system="be brief"))
        assert backend.pretrain and backend.prompt(msgs) == llm.tokenizer.bos_token + "Once upon a time"
        last = list(chat_stream(backend, msgs, Settings(max_tokens=6, temperature=0.0)))[-1]
        # independent: the engine on bos + text directly, not through the web backend
        ids = [llm.tokenizer.bos_token_id, *llm.tokenizer.encode("Once upon a time", add_special_tokens=False)]
        direct = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0.0,
                                                  stop_token_ids=backend._stop_ids))[0].outputs[0]
        assert last.content == direct.text and last.tokens == len(direct.token_ids)
    finally:
        backend.close()


def test_closing_an_answer_aborts_the_engine_request(tiny):
    """The stop buttons close the answer's stream; the in-process engine must then abort the request at once.

    The engine runs without its background loop here, so it advances only while the answer is read: an answer
    closed without an abort would stay unfinished for ever (the test cannot pass by the answer ending by itself).
    """
    model, tok = tiny
    backend = EngineBackend(str(model), tokenizer=str(tok), max_model_len=512, max_num_seqs=1)
    llm = backend.llm
    llm.shutdown()
    replies = chat_stream(backend, [{"role": "user", "content": "你好"}], Settings(max_tokens=400, temperature=0.0))
    next(replies), next(replies)
    assert llm.has_unfinished() and llm.scheduler.slots.num_free == 0
    replies.close()
    outs = llm.step()  # applies the abort
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    assert not llm.has_unfinished() and llm.scheduler.slots.num_free == 1


def test_sliders_start_at_the_models_sampling_defaults(engine):
    """A MiniMind2 checkpoint: eval_llm.py's temperature 0.85 / top_p 0.85, with HF generate's top_k 50 applied
    to every answer (the other sources are tested in test_generation_defaults.py)."""
    assert (engine.defaults().temperature, engine.defaults().top_p, engine.sampling.top_k) == (0.85, 0.85, 50)
