"""benchmarks/: the load generator against a real `minimind serve` on 127.0.0.1 (a tiny model), and the numbers it
summarizes, checked against hand arithmetic. No timing asserts."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_model, tokenizer_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_load
from stream_client import StreamClient, summarize, usage_tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("minimind2", vocab_size=6400).save_pretrained(folder)
    for f in tokenizer_dir("minimind2").iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    port = serve_load.free_port()
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(folder), "--threads", "1", "--max-num-seqs", "3",
           "--max-model-len", "64", "--served-model-name", serve_load.MODEL_ID, "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning"]
    srv = serve_load.Server("minimind serve", cmd, port, {**os.environ, "OMP_NUM_THREADS": "1"},
                            folder / "serve.log", 3, 120)
    yield srv, f"http://127.0.0.1:{port}"
    srv.stop()
    assert srv.proc.poll() is not None  # stopped, not left running


def test_every_stream_is_timed_and_counted(server):
    srv, _ = server
    prompts = serve_load.round_prompts(3, 8, 6400, 0)
    for _ in range(2):  # a second round on the same client
        reqs = srv.run_round(prompts, 5, 1.0)
        assert len(reqs) == 3
        for r in reqs:
            assert r["tokens"] == 5  # usage.completion_tokens of each stream: ignore_eos held
            assert 0 <= r["chunks"] <= 5  # chunks with text (a partial UTF-8 character streams as empty text)
            assert r["start"] <= r["first"] <= r["end"]
    assert srv.cpu > 0


def test_an_error_response_raises(server):
    _, url = server
    with pytest.raises(RuntimeError, match="404|400"):
        StreamClient(url, "no-such-model").run_round([[5, 6, 7]], 3, 1.0)


def test_summary_by_hand():
    # round 1: two requests from t=0, first text at 0.1 / 0.2 s, ends at 1.0 / 2.0 s, 11 / 21 tokens: 32 tokens
    # in 2 s; round 2: one request of 11 tokens in 0.5 s -> 22 tok/s; median of (16, 22) = 19
    rounds = [[{"start": 0.0, "first": 0.1, "end": 1.0, "tokens": 11, "chunks": 0},
               {"start": 0.0, "first": 0.2, "end": 2.0, "tokens": 21, "chunks": 0}],
              [{"start": 5.0, "first": 5.3, "end": 5.5, "tokens": None, "chunks": 11}]]  # no usage: chunks count
    s = summarize(rounds)
    assert s["rounds_tok_s"] == pytest.approx([16.0, 22.0]) and s["tok_s"] == pytest.approx(19.0)
    assert s["ttft_p50_ms"] == pytest.approx(200.0)  # TTFTs 100, 200, 300 ms
    assert s["ttft_p95_ms"] == pytest.approx(290.0)  # 200 + 0.9 * (300 - 200)
    assert s["itl_p50_ms"] == pytest.approx(90.0)  # 900/10, 1800/20, 200/10 ms
    assert s["tokens"] == [11, 21]


def test_usage_is_read_from_the_last_usage_event():
    tail = (b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\ndata: [DONE]\n\n')
    assert usage_tokens(tail) == 7
    assert usage_tokens(b'data: {"choices":[{"text":"a"}]}\n\n') is None
    with pytest.raises(RuntimeError, match="boom"):
        usage_tokens(b'data: {"error":{"message":"boom"}}\n\n')
