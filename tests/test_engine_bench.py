"""`minimind bench` plumbing on a tiny model: the worker's measurements, the table, JSON and chart.
No timing asserts: only that every number is produced and positive."""
from __future__ import annotations

import json

from conftest import tiny_model
from minimind.apps import bench
from minimind.apps.bench_workers import run_inline


def test_worker_table_and_chart(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=256).save_pretrained(folder)
    args = {"model": str(folder), "dtype": "int8", "threads": 1, "prompt_len": 16, "decode_tokens": 4,
            "concurrency": [1, 2], "repeats": 1, "peer_concurrency": [1], "compile": False, "chat_turns": 2}
    ours = run_inline("minimind", args)
    for key in ("prefill_tps", "decode_tps", "agg_tps@2", "ttft_ms@2", "peak_rss_mb", "kv_cache_mb",
                "chat_ttft_ms_turn2_cached", "chat_ttft_ms_turn2_uncached"):
        assert ours[key] > 0, key
    hf = run_inline("transformers", {**args, "dtype": "fp32"})
    assert hf["decode_tps"] > 0 and hf["agg_tps@1"] > 0
    report = {"machine": bench.machine(threads=1), "notes": ["llama.cpp [skipped] for the test"],
              "args": {"concurrency": [1, 2], "repeats": 1, "threads": 1, "chat_turns": 2},
              "results": [{"model": "tiny", "dtype": "int8", "impl": "minimind", **ours},
                          {"model": "tiny", "dtype": "int8", "impl": "transformers", **hf},
                          {"model": "tiny", "dtype": "fp32", "impl": "llama.cpp", "error": "boom"}]}
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "minimind bench" in out and "[skipped]" in out and "turn 1 -> turn 2" in out
    assert report["machine"]["read_gb_s"] > 0 and "GB/s with threads=1" in out
    bench.draw_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    json.dumps(report)


def test_rounds_alternate_between_live_workers(tmp_path):
    # the orchestrator keeps both implementations loaded (real subprocesses) and asks them round by round; a
    # worker that cannot start reports its error instead of hanging the run
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=256).save_pretrained(folder)
    base = {"model": str(folder), "dtype": "fp32", "threads": 1, "prompt_len": 16, "decode_tokens": 4,
            "concurrency": [2], "repeats": 2, "peer_concurrency": [1], "compile": False, "chat_turns": 0}
    out = bench.measure(["minimind", "transformers"], base)
    for impl in ("minimind", "transformers"):
        assert out[impl]["prefill_tps"] > 0 and out[impl]["decode_tps"] > 0 and out[impl]["peak_rss_mb"] > 0, impl
    assert out["minimind"]["agg_tps@2"] > 0 and out["transformers"]["agg_tps@1"] > 0
    broken = bench.measure(["minimind", "llama.cpp"], {**base, "gguf": str(tmp_path / "missing.gguf")})
    assert broken["minimind"]["decode_tps"] > 0
    assert "error" in broken["llama.cpp"] and broken["llama.cpp"]["error"]
