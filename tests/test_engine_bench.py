"""`minimind bench` plumbing on a tiny model: the worker's measurements, the table, JSON and chart.
No timing asserts: only that every number is produced and positive."""
from __future__ import annotations

import json

from conftest import tiny_model
from minimind.apps import bench


def test_worker_table_and_chart(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=256).save_pretrained(folder)
    args = {"model": str(folder), "dtype": "int8", "threads": 1, "prompt_len": 16, "decode_tokens": 4,
            "concurrency": [1, 2], "repeats": 1, "peer_concurrency": [1], "compile": False, "chat_turns": 2}
    ours = bench.worker_ours(args)
    for key in ("prefill_tps", "decode_tps", "agg_tps@2", "ttft_ms@2", "peak_rss_mb", "kv_cache_mb",
                "chat_ttft_ms_turn2_cached", "chat_ttft_ms_turn2_uncached"):
        assert ours[key] > 0, key
    hf = bench.worker_hf({**args, "dtype": "fp32"})
    assert hf["decode_tps"] > 0 and hf["agg_tps@1"] > 0
    report = {"machine": bench.machine(), "notes": ["llama.cpp [skipped] for the test"],
              "args": {"concurrency": [1, 2], "repeats": 1, "threads": 1, "chat_turns": 2},
              "results": [{"model": "tiny", "dtype": "int8", "impl": "minimind", **ours},
                          {"model": "tiny", "dtype": "int8", "impl": "transformers", **hf},
                          {"model": "tiny", "dtype": "fp32", "impl": "llama.cpp", "error": "boom"}]}
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "minimind bench" in out and "[skipped]" in out and "turn 1 -> turn 2" in out
    bench.draw_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    json.dumps(report)
