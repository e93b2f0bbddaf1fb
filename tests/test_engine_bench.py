"""`minimind bench` on a tiny model: the workers' measurements, the table's ratios, JSON and chart. No timing
asserts: only that every number is produced."""
from __future__ import annotations

import json
import sys

from conftest import tiny_model
from minimind.apps import bench


def _tiny(tmp_path) -> str:
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=256).save_pretrained(folder)
    return str(folder)


def test_workers_take_turns_and_a_broken_one_reports_its_error(tmp_path):
    a = {"model": _tiny(tmp_path), "dtype": "int8", "threads": 1, "prompt_len": 16, "decode_tokens": 4,
         "repeats": 2, "compile": False}
    out = bench.measure(["minimind", "transformers"], a)
    for impl in ("minimind", "transformers"):
        assert set(out[impl]) == {"prefill_tps", "decode_tps", "peak_rss_mb"}, out[impl]
        assert min(out[impl].values()) > 0, impl
    # a GGUF that does not exist (or no llama-cpp-python): that worker fails, ours is measured all the same
    broken = bench.measure(["minimind", "llama.cpp"], {**a, "repeats": 1, "gguf": str(tmp_path / "missing.gguf")})
    assert broken["minimind"]["decode_tps"] > 0
    assert broken["llama.cpp"]["error"]


def test_table_quotes_ours_over_each_peer_and_draws_a_chart(tmp_path, capsys):
    rows = [{"model": "tiny", "dtype": "bf16", "impl": "minimind", "prefill_tps": 900.0, "decode_tps": 300.0,
             "peak_rss_mb": 350.0},
            {"model": "tiny", "dtype": "bf16", "impl": "transformers", "prefill_tps": 300.0, "decode_tps": 40.0,
             "peak_rss_mb": 500.0},
            {"model": "tiny", "dtype": "bf16", "impl": "llama.cpp", "error": "boom"}]
    report = {"machine": {"cpu": "test cpu", "cores": 2, "time": "now"}, "notes": ["a [bracketed] note"],
              "args": {"repeats": 1, "prompt_len": 16, "decode_tokens": 4, "threads": 1}, "results": rows}
    assert bench.ratios(rows, rows[1]) == [3.0, 7.5] and bench.ratios(rows, rows[0]) == [None, None]
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "3.00" in out and "7.50" in out and "boom" in out and "[bracketed]" in out
    bench.draw_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report)


def test_command_writes_json_and_plot(tmp_path, capsys):
    model = _tiny(tmp_path)
    rc = bench.main(["--models", model, "--dtypes", "fp32", "--peers", "", "--repeats", "1", "--threads", "1",
                     "--prompt-len", "16", "--decode-tokens", "4", "--json", str(tmp_path / "b.json"),
                     "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert [(r["model"], r["dtype"], r["impl"]) for r in report["results"]] == [("tiny", "fp32", "minimind")]
    assert report["results"][0]["decode_tps"] > 0 and (tmp_path / "b.png").stat().st_size > 0
    assert "minimind bench" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert bench.main(["--models", "small", "--plot", "x.png"]) == 2
    assert "pip install 'minimind[bench]'" in capsys.readouterr().err


def test_gguf_dtype_runs_a_gguf_file_as_stored_on_both_sides(tmp_path):
    """--dtypes gguf: our engine and llama.cpp get the same .gguf file; other models are skipped with a note."""
    import argparse

    import gguf
    import pytest

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from test_gguf_loading import llama, write_gguf

    path = write_gguf(tmp_path / "m.gguf", llama(hidden_size=64, intermediate_size=96), "llama",
                      gguf.GGMLQuantizationType.Q4_1)
    args = argparse.Namespace(models=[str(path), _tiny(tmp_path)], dtypes=["gguf"], peers=["llama.cpp"], threads=1,
                              prompt_len=16, decode_tokens=4, repeats=1, compile=False, tokenizer=None,
                              llama_bench=None)
    report = bench.run(args)
    assert {r["impl"] for r in report["results"]} == {"minimind", "llama.cpp"}
    assert all(r.get("decode_tps", 0) > 0 for r in report["results"]), report["results"]
    assert any("dtype gguf is for .gguf files" in n for n in report["notes"])


def llama_bench_binary() -> str | None:
    """llama.cpp's llama-bench: $LLAMA_BENCH, on PATH, or where benchmarks/README.md builds it."""
    import os
    import shutil
    from pathlib import Path

    for candidate in (os.environ.get("LLAMA_BENCH"), "llama-bench",
                      str(Path.home() / "llama-build" / "build" / "bin" / "llama-bench")):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def test_llama_bench_peer_runs_the_binary_on_the_same_file(tmp_path):
    """--peers llama-bench: llama.cpp's own benchmark binary on the same GGUF, its numbers and its peak RSS read
    from its JSON output and its process; without the binary the peer is skipped with a note."""
    import argparse

    import gguf
    import pytest

    from test_gguf_loading import llama, write_gguf

    path = write_gguf(tmp_path / "m.gguf", llama(hidden_size=64, intermediate_size=96), "llama",
                      gguf.GGMLQuantizationType.Q8_0)
    args = argparse.Namespace(models=[str(path)], dtypes=["gguf"], peers=["llama-bench"], threads=1, prompt_len=16,
                              decode_tokens=4, repeats=1, compile=False, tokenizer=None, llama_bench="no-such-binary")
    report = bench.run(args)
    assert {r["impl"] for r in report["results"]} == {"minimind"}
    assert any("llama-bench skipped" in n for n in report["notes"])
    binary = llama_bench_binary()
    if binary is None:
        pytest.skip("no llama-bench binary (set LLAMA_BENCH; benchmarks/README.md builds it)")
    report = bench.run(argparse.Namespace(**{**vars(args), "llama_bench": binary}))
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"minimind", "llama-bench"}, report
    assert rows["llama-bench"]["prefill_tps"] > 0 and rows["llama-bench"]["decode_tps"] > 0
    assert 0 < rows["llama-bench"]["peak_rss_mb"] < rows["minimind"]["peak_rss_mb"]  # a C binary, not torch


def test_unknown_peer_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        bench.main(["--peers", "vllm"])
    assert exit_.value.code == 2 and "unknown peer(s) vllm" in capsys.readouterr().err
