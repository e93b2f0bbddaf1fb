"""The reply parser gives the same split however the text is chunked, and the split the whole text gets by hand;
and the `minimind serve` command line parses the seeds' model flags."""
from __future__ import annotations

import json
import random

import pytest

from minimind.text.reply import ReplyParser, collect

# (reply, prompt opened <think>) -> (reasoning, content, tool call names): worked out by hand
CASES = {
    ("<think>\nhmm\n</think>\n\nHello", False): ("hmm", "Hello", []),
    ("<think>\nhmm\n</think>\n\nHello", True): ("hmm", "Hello", []),
    (" hello world", False): ("", " hello world", []),
    (" hello world", True): (" hello world", "", []),
    ("<think>abc", False): ("abc", "", []),
    ("<think>abc", True): ("abc", "", []),
    ("a <tool_c", False): ("", "a <tool_c", []),
    ("<thi", False): ("", "<thi", []),
    ("<thi", True): ("<thi", "", []),
    ("plain\n\ntext\n", False): ("", "plain\n\ntext\n", []),
    ('x<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name":"g"}</tool_call>', False):
        ("", "x", ["f", "g"]),
    ("<tool_call>bad</tool_call> tail", False): ("", "<tool_call>bad</tool_call> tail", []),
    ('<think>\nplan\n</think>\n\n<tool_call>\n{"name": "f"}\n</tool_call>', False): ("plan", "", ["f"]),
    ('<think>\nplan\n</think>\n\n<tool_call>\n{"name": "f"}\n</tool_call>', True): ("plan", "", ["f"]),
}


def run(text: str, think: bool, sizes: random.Random | None) -> tuple:
    p = ReplyParser(started_in_think=think, parse_tools=True)
    events, i = [], 0
    while i < len(text):
        j = len(text) if sizes is None else i + sizes.randint(1, 5)
        events += p.feed(text[i:j])
        i = j
    reasoning, content, calls = collect(events + p.finish())
    return reasoning, content, [c["function"] for c in calls], [c["index"] for c in calls]


@pytest.mark.parametrize(("text", "think"), list(CASES))
def test_streaming_split_matches_the_whole_text(text, think):
    whole = run(text, think, None)
    rng = random.Random(0)
    for _ in range(30):
        assert run(text, think, rng) == whole
    reasoning, content, calls, indexes = whole
    assert (reasoning, content, [c["name"] for c in calls]) == CASES[text, think]
    assert indexes == list(range(len(calls)))


def test_tools_off_keeps_tags_as_text():
    p = ReplyParser(parse_tools=False)
    assert collect(p.feed('<tool_call>{"name": "f"}</tool_call>') + p.finish())[1] == '<tool_call>{"name": "f"}</tool_call>'


def test_cli_flags():
    from minimind.serve.launch import build_parser, parse_lora

    args = build_parser().parse_args(["--load_from", "model", "--weight", "full_sft", "--hidden_size", "512",
                                      "--lora", "id=out/lora/lora_identity_512.pth", "--port", "9000"])
    assert args.host == "127.0.0.1" and args.port == 9000 and args.weight == "full_sft" and args.hidden_size == 512
    assert parse_lora(args.lora) == {"id": "out/lora/lora_identity_512.pth"}
    with pytest.raises(ValueError):
        parse_lora(["nopath"])
    assert args.kv_cache_dtype == "auto"
    assert build_parser().parse_args(["--kv-cache-dtype", "float16"]).kv_cache_dtype == "float16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kv-cache-dtype", "int4"])


def test_lora_adapters_become_model_ids(tmp_path):
    import torch

    from conftest import tiny_model, tokenizer_dir
    from minimind.checkpoint.lora import apply_lora, lora_layers, save_lora
    from minimind.engine import SamplingParams
    from minimind.serve.launch import build_parser, load_engines

    tok = tokenizer_dir("minimind2")
    model = tiny_model(vocab_size=6400, hidden_size=64)
    torch.save(model.state_dict(), tmp_path / "full_sft_64.pth")
    apply_lora(model, rank=4)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora.B.weight, std=1.0)
    save_lora(model, tmp_path / "lora_x_64.pth")
    args = build_parser().parse_args(["--load_from", str(tok), "--save_dir", str(tmp_path), "--weight", "full_sft",
                                      "--hidden_size", "64", "--lora", f"x={tmp_path / 'lora_x_64.pth'}",
                                      "--max-model-len", "64", "--max-num-seqs", "1"])
    engines = load_engines(args)
    assert list(engines) == ["full_sft"] and list(engines["full_sft"].lora_names) == ["x"]  # one shared engine
    from minimind.serve.openai_server import _as_engines

    assert list(_as_engines(engines, None, 8)) == ["full_sft", "x"]  # the adapter is a served model id
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = engines["full_sft"]
    base, adapted = (llm.generate([[5, 6, 7]], greedy, lora=a)[0].outputs[0].token_ids for a in (None, "x"))
    ids = [5, 6, 7]
    with torch.no_grad():  # reference: the LoRALinear forward W x + B A x of the model the file was saved from
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert adapted == ids[3:] and base != adapted
    assert llm.kv.k.dtype == torch.float32  # --kv-cache-dtype auto on CPU
    args.kv_cache_dtype = "float16"
    assert load_engines(args)["full_sft"].kv.k.dtype == torch.float16


def test_serve_steps_on_the_thread_that_loaded_the_model(tmp_path, monkeypatch):
    """`minimind serve` loads the weights on its engine thread and every step runs there (one OpenMP team)."""
    import threading

    import torch
    from fastapi.testclient import TestClient

    from conftest import tiny_model, tokenizer_dir
    from minimind.engine import LLM
    from minimind.serve import launch

    torch.save(tiny_model(vocab_size=6400, hidden_size=64).state_dict(), tmp_path / "full_sft_64.pth")
    args = launch.build_parser().parse_args(["--load_from", str(tokenizer_dir("minimind2")), "--save_dir",
                                             str(tmp_path), "--weight", "full_sft", "--hidden_size", "64",
                                             "--max-model-len", "64", "--max-num-seqs", "2"])
    seen = {"load": set(), "step": set()}
    load, step = launch.load_engines, LLM.step
    monkeypatch.setattr(launch, "load_engines", lambda a: seen["load"].add(threading.get_ident()) or load(a))
    monkeypatch.setattr(LLM, "step", lambda self: seen["step"].add(threading.get_ident()) or step(self))
    with TestClient(launch.build_app(args), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert len(seen["load"]) == 1 and seen["step"] == seen["load"]
    assert threading.get_ident() not in seen["load"]


@pytest.mark.parametrize(("flags", "inline"), [(["--max-num-seqs", "1"], False), (["--max-num-seqs", "2"], False),
                                               (["--max-num-seqs", "1", "--engine-loop", "thread"], False),
                                               (["--max-num-seqs", "2", "--engine-loop", "inline"], True)])
def test_engine_loop_flag(tmp_path, flags, inline):
    """--engine-loop auto steps on the engine thread, also with one slot; inline on the event loop; both serve."""
    import torch
    from fastapi.testclient import TestClient

    from conftest import tiny_model, tokenizer_dir
    from minimind.serve import launch

    torch.save(tiny_model(vocab_size=6400, hidden_size=64).state_dict(), tmp_path / "full_sft_64.pth")
    args = launch.build_parser().parse_args(["--load_from", str(tokenizer_dir("minimind2")), "--save_dir",
                                             str(tmp_path), "--weight", "full_sft", "--hidden_size", "64",
                                             "--max-model-len", "64", *flags])
    app = launch.build_app(args)
    engine = app.state.ctx.engines["full_sft"]
    assert engine.inline == inline and (engine.engine_thread is None) == inline
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_stream_interval_flag(tmp_path):
    """--stream-interval 4: a 10-token stream comes in at most 4 text chunks (first token, then per 4 tokens, the
    rest with the end), the same text as the answer not streamed; 0 is refused by the parser."""
    import torch
    from fastapi.testclient import TestClient

    from conftest import tiny_model, tokenizer_dir
    from minimind.serve import launch

    torch.save(tiny_model(vocab_size=6400, hidden_size=64).state_dict(), tmp_path / "full_sft_64.pth")
    base = ["--load_from", str(tokenizer_dir("minimind2")), "--save_dir", str(tmp_path), "--weight", "full_sft",
            "--hidden_size", "64", "--max-model-len", "64"]
    with pytest.raises(SystemExit):
        launch.build_parser().parse_args([*base, "--stream-interval", "0"])
    app = launch.build_app(launch.build_parser().parse_args([*base, "--stream-interval", "4"]))
    assert app.state.ctx.engines["full_sft"].llm.stream_interval == 4
    body = {"prompt": [5, 6, 7], "max_tokens": 10, "ignore_eos": True, "temperature": 0}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c["text"] for e in events for c in e["choices"] if c["text"]]
    assert "".join(texts) == whole and 1 <= len(texts) <= 4


def test_llm_launch_builds_and_steps_on_one_thread():
    import threading

    from conftest import tiny_model
    from minimind.engine import LLM, SamplingParams

    seen = {"build": set(), "step": set()}
    step = LLM.step

    class Probe(LLM):
        def step(self):
            seen["step"].add(threading.get_ident())
            return step(self)

    def build():
        seen["build"].add(threading.get_ident())
        return Probe(tiny_model(vocab_size=256, hidden_size=64), max_model_len=32, max_num_seqs=2)

    llm = Probe.launch(build)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
    assert seen["step"] == seen["build"] and threading.get_ident() not in seen["build"]
    with pytest.raises(ValueError, match="boom"):
        LLM.launch(lambda: (_ for _ in ()).throw(ValueError("boom")))


@pytest.mark.parametrize("flags", [[], ["--engine-loop", "inline"]], ids=["engine-thread", "inline"])
def test_serve_process_exits_on_forced_shutdown_mid_stream(tmp_path, flags):
    """A second Ctrl-C while a stream runs ends the process (the engine loop must not keep the interpreter alive),
    with the engine on its thread and stepped inline on the event loop."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import torch

    from conftest import tiny_model, tokenizer_dir

    torch.save(tiny_model(vocab_size=6400, hidden_size=64).state_dict(), tmp_path / "full_sft_64.pth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minimind", "serve", "--load_from", str(tokenizer_dir("minimind2")), "--save_dir",
           str(tmp_path), "--weight", "full_sft", "--hidden_size", "64", "--port", str(port), "--max-model-len", "4096",
           "--threads", "1", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        body = {"prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):  # the stream is running
                pass
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_server_freezes_its_startup_heap_before_serving(monkeypatch):
    """`minimind serve` moves the startup's objects out of the collector's reach (a full collection then walks only
    what serving made) right before uvicorn runs: in a fresh interpreter, the oldest generation keeps a handful of
    objects instead of the imports' tens of thousands; and main() calls it before uvicorn.run."""
    import subprocess
    import sys
    from types import SimpleNamespace

    code = ("import gc, torch, fastapi, minimind.serve.openai_server\n"
            "from minimind.serve.launch import freeze_startup_heap\n"
            "gc.collect(); before = len(gc.get_objects(2))\n"
            "frozen = freeze_startup_heap(); print(before, frozen, len(gc.get_objects(2)))")
    before, frozen, after = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert before > 20000 and frozen > 0.9 * before and after < 100

    import uvicorn

    from minimind.serve import launch

    calls = []
    app = SimpleNamespace(state=SimpleNamespace(ctx=SimpleNamespace(engines={"m": None})))
    monkeypatch.setattr(launch, "build_app", lambda args: app)
    monkeypatch.setattr(launch, "freeze_startup_heap", lambda: calls.append("freeze"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append("run"))
    assert launch.main(["--port", "1"]) == 0
    assert calls == ["freeze", "run"]
