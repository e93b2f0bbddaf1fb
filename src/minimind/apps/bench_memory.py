"""`minimind bench` memory row: peak RSS of a single-chat engine, with the bytes accounted.

The worker runs in its own interpreter (one per model and dtype) so its VmHWM is its own. It builds the engine
a chat uses (max_num_seqs=1, max_model_len=2048 or the model's limit), prefills a 256-token prompt and decodes
128 tokens, then splits the peak into: runtime baseline (torch and the engine imported, no model yet), weights
(the runner's tensors), KV cache (preallocated), and other (load transients, activations, tokenizer, allocator).
"""
from __future__ import annotations

import resource
from pathlib import Path


def _status_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MB. VmHWM rather than ru_maxrss: Linux carries ru_maxrss
    across exec, so a worker would report the orchestrator's peak whenever that is larger."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def worker_memory(a: dict) -> dict:
    """a: model, dtype (fp32 / bf16 / int8 / dynamic), threads; optional prompt_len (256), decode_tokens (128),
    max_model_len (2048)."""
    import torch

    from minimind.engine import LLM, SamplingParams

    baseline = _status_mb("VmRSS")  # the runtime every engine process pays before any model
    from .bench_workers import engine_kwargs, prompts

    prompt_len, decode = a.get("prompt_len", 256), a.get("decode_tokens", 128)
    llm = LLM(a["model"], max_num_seqs=1, max_model_len=a.get("max_model_len", 2048), threads=a["threads"],
              **engine_kwargs(a["dtype"]))
    prompt_len = min(prompt_len, llm.max_model_len - decode - 1)  # models with a short context
    params = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    with torch.no_grad():
        out = llm.generate(prompts(1, prompt_len, llm.config.vocab_size, 7), params)[0]
    peak = peak_rss_mb()
    weights, kv = llm.runner.weight_bytes / 2**20, llm.kv.nbytes / 2**20
    return {"chat_peak_rss_mb": peak, "chat_baseline_mb": baseline, "chat_weights_mb": weights,
            "chat_kv_cache_mb": kv, "chat_other_mb": max(peak - baseline - weights - kv, 0.0),
            "chat_max_model_len": llm.max_model_len, "chat_prompt_tokens": prompt_len,
            "chat_decoded_tokens": len(out.outputs[0].token_ids)}


def print_memory_table(report: dict, console) -> None:
    """A second, small table: the single-chat configuration's peak RSS and where it goes."""
    from rich.table import Table

    rows = [r for r in report["results"] if r.get("chat_peak_rss_mb") is not None]
    if not rows:
        return
    table = Table(title="memory of one chat (max_num_seqs=1, 256-token prompt + 128 tokens; MB, VmHWM)")
    for col in ("model", "dtype", "peak RSS", "runtime baseline", "weights", "KV cache", "other", "max_model_len"):
        table.add_column(col, justify="left" if col in ("model", "dtype") else "right")
    for r in rows:
        table.add_row(r["model"], r["dtype"], *[f"{r[k]:,.0f}" for k in (
            "chat_peak_rss_mb", "chat_baseline_mb", "chat_weights_mb", "chat_kv_cache_mb", "chat_other_mb")],
            str(r["chat_max_model_len"]))
    console.print(table)
