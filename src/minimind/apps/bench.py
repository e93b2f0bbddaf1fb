"""`minimind bench`: our engine against transformers `generate` and llama.cpp, side by side in one run.

For each model and dtype it measures prefill tokens/s (a 256-token prompt), batch-1 decode tokens/s
(128 tokens), aggregate throughput and mean TTFT at 1/8/32 concurrent sequences, and peak RSS (with the KV
cache of the 32 sequences), plus the peak RSS of a single-chat engine with its breakdown (bench_memory.py).
Every (model, implementation, dtype) runs in its own subprocess so peak RSS is its own; the implementations of
one (model, dtype) stay loaded side by side and take turns round by round for prefill and decode, so a ratio
compares numbers from the same minutes (bench_workers.py). Prints a table, writes JSON and a PNG chart. Timings
are best-of-N wall clock: the machine is shared, so quote ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_memory import print_memory_table
from .bench_workers import AGG_ROUNDS, METRICS, worker_loop

MODELS = {"small": "minimind2-small", "base": "minimind2", "default": None}  # None = the embedded model
LLAMA_TYPES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}  # matched precision for llama.cpp
SHARED_TOKENIZER = Path(__file__).resolve().parents[3].parent / "shared" / "minimind-tokenizers" / "minimind2"


# ---------------------------------------------------------------- orchestration
def _prepare_model(name: str, workdir: Path, tokenizer: Path | None) -> tuple[str, str]:
    """-> (label, path). Random-weight presets are saved once so every worker loads identical weights."""
    if name == "default":
        from minimind.checkpoint.default_model import default_model_dir

        return "SmolLM2-135M (default)", str(default_model_dir())
    if name not in MODELS:  # a checkpoint path
        return Path(name).name, name
    import torch

    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM

    folder = workdir / name
    torch.manual_seed(0)
    MiniMindForCausalLM(MiniMindConfig.from_preset(MODELS[name])).save_pretrained(folder)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    return f"{MODELS[name]} (random)", str(folder)


def _gguf(path: str, dtype: str, workdir: Path, note: list) -> str | None:
    out = workdir / f"{Path(path).name}-{LLAMA_TYPES[dtype]}.gguf"
    if out.exists():
        return str(out)
    try:
        from minimind.convert import export_gguf

        return str(export_gguf(path, out, outtype=LLAMA_TYPES[dtype], show_progress=False))
    except Exception as exc:  # noqa: BLE001 - no tokenizer for a random preset, or the exporter refused
        note.append(f"llama.cpp skipped for {Path(path).name} {dtype}: GGUF export failed ({exc})")
        return None


class _Worker:
    """One implementation in its own subprocess (bench_workers' protocol): its peak RSS is its own."""

    def __init__(self, kind: str, args: dict):
        cmd = [sys.executable, "-m", "minimind.apps.bench", "--worker", kind, json.dumps(args)]
        # stderr to a file, not a pipe: nobody reads it while the worker runs, and a chatty library (warnings,
        # progress bars) would fill a pipe's buffer and block the worker forever
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker; close() closes it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.error = None if self._read() == "ready" else self._failure()

    def _read(self) -> str:
        return self.proc.stdout.readline().strip()

    def _failure(self) -> str:
        self.proc.kill()
        self.proc.wait()
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        return lines[-1] if lines else "failed"

    def ask(self, command: str):
        """-> the JSON answer, or None once the worker has failed (self.error says why)."""
        if self.error:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            line = self._read()
            return json.loads(line)
        except (OSError, ValueError):
            self.error = self._failure()
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            f.close()


def measure(impls: list[str], base: dict) -> dict[str, dict]:
    """Every implementation of one (model, dtype), loaded side by side; prefill and decode rounds alternate
    between them (the starting implementation rotates), best of base["repeats"] each; then each one's
    remaining measurements, one worker at a time."""
    workers = {impl: _Worker(impl, base) for impl in impls}
    best = {impl: {} for impl in impls}
    try:
        for r in range(base["repeats"]):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for name, key in METRICS.items():
                for impl in order:
                    value = workers[impl].ask(f"{name} {r}")
                    if value is not None:
                        best[impl][key] = max(best[impl].get(key, 0.0), value)
        out = {}
        for impl in impls:
            print(f"  {impl}: the rest ...", file=sys.stderr, flush=True)
            rest = workers[impl].ask("rest")
            error = workers[impl].error
            out[impl] = {"error": error} if error else {**best[impl], **rest}
        return out
    finally:
        for w in workers.values():
            w.close()


def _spawn_memory(args: dict) -> dict:
    cmd = [sys.executable, "-m", "minimind.apps.bench", "--worker", "memory", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(threads: int | None = None) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if threads:
        out["read_gb_s"] = read_bandwidth(threads)
    return out


def read_bandwidth(threads: int, mb: int = 104) -> float | None:
    """GB/s at which `threads` threads read a buffer the size of MiniMind2-Small's fp32 weights (the kernels' stream
    sum, best of 10): the ceiling of every batch-1 decoder, which reads each weight once per token. None without
    the C kernels."""
    import torch

    from minimind.engine.fused import stream_sum

    x = torch.ones(mb * 2**20 // 4)
    if stream_sum(x, threads) is None:
        return None
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        stream_sum(x, threads)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def run(args) -> dict:
    have_llama = _has_llama_cpp()
    notes = [] if have_llama else [("llama.cpp peer skipped: llama-cpp-python is not installed "
                                    "(pip install 'minimind[llamacpp]')")]
    tokenizer = Path(args.tokenizer) if args.tokenizer else (SHARED_TOKENIZER if SHARED_TOKENIZER.is_dir() else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minimind-bench-") as tmp:
        for name in args.models:
            label, path = _prepare_model(name, Path(tmp), tokenizer)
            for dtype in args.dtypes:
                base = {"model": path, "dtype": dtype, "threads": args.threads, "prompt_len": args.prompt_len,
                        "decode_tokens": args.decode_tokens, "concurrency": args.concurrency,
                        "repeats": args.repeats, "peer_concurrency": args.peer_concurrency,
                        "compile": args.compile, "chat_turns": args.chat_turns}
                impls = ["minimind"] + (["transformers"] if "transformers" in args.peers else [])
                if have_llama and "llama.cpp" in args.peers and dtype in LLAMA_TYPES:
                    gguf = _gguf(path, dtype, Path(tmp), notes)
                    if gguf:
                        impls.append("llama.cpp")
                        base["gguf"] = gguf
                print(f"  {label} {dtype}: {', '.join(impls)}, rounds alternating ...", file=sys.stderr, flush=True)
                measured = measure(impls, base)
                for impl in impls:
                    row = {"model": label, "dtype": dtype, "impl": impl, **measured[impl]}
                    if impl == "minimind" and args.chat_memory:  # its own process: its own peak
                        mem = _spawn_memory(base)
                        row.update({k: v for k, v in mem.items() if k != "error"})
                        if "error" in mem:
                            notes.append(f"chat memory {label} {dtype}: {mem['error']}")
                    rows.append(row)
    return {"machine": machine(args.threads), "args": vars(args), "notes": notes, "results": rows}


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---------------------------------------------------------------- reporting
def _fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    conc = report["args"]["concurrency"]
    table = Table(title="minimind bench (tokens/s; higher is better; prefill and decode best of "
                        f"{report['args']['repeats']}, agg@N best of {AGG_ROUNDS} with that round's TTFT, "
                        f"threads={report['args']['threads']})")
    for col in ["model", "dtype", "impl", "prefill", "decode b1", "x HF", "x llama.cpp",
                *[f"agg@{n}" for n in conc], *[f"TTFT@{n} ms" for n in conc], f"peak RSS MB (KV of {max(conc)} seq.)"]:
        table.add_column(col, justify="left" if col in ("model", "dtype", "impl") else "right")
    rows = report["results"]
    for r in rows:
        peers = {p["impl"]: p for p in rows if p["model"] == r["model"] and p["dtype"] == r["dtype"]}
        ratio = {k: (r.get("decode_tps") / peers[k]["decode_tps"]) if r.get("decode_tps") and k in peers
                 and peers[k].get("decode_tps") and r["impl"] == "minimind" else None
                 for k in ("transformers", "llama.cpp")}
        if "error" in r:
            table.add_row(r["model"], r["dtype"], r["impl"], f"[red]{r['error'][:60]}")
            continue
        table.add_row(r["model"], r["dtype"], r["impl"], _fmt(r.get("prefill_tps")), _fmt(r.get("decode_tps")),
                      _fmt(ratio["transformers"], 2), _fmt(ratio["llama.cpp"], 2),
                      *[_fmt(r.get(f"agg_tps@{n}")) for n in conc], *[_fmt(r.get(f"ttft_ms@{n}")) for n in conc],
                      _fmt(r.get("peak_rss_mb")))
    console = Console(width=max(Console().width, 200))
    console.print(table)
    print_memory_table(report, console)
    turns = report["args"].get("chat_turns")
    for r in rows:
        if r.get(f"chat_ttft_ms_turn{turns}_cached") is not None:
            console.print(f"{r['model']} {r['dtype']}: {turns}-turn chat TTFT turn 1 -> turn {turns}: "
                          f"{r['chat_ttft_ms_turn1_cached']:.0f} -> {r[f'chat_ttft_ms_turn{turns}_cached']:.0f} ms "
                          f"with prefix cache, {r['chat_ttft_ms_turn1_uncached']:.0f} -> "
                          f"{r[f'chat_ttft_ms_turn{turns}_uncached']:.0f} ms without")
    m = report["machine"]
    if m.get("read_gb_s"):  # what bounds batch-1 decode: every weight is read once per token
        console.print(f"{m['cpu']}, {m['cores']} cores: memory read {m['read_gb_s']:.1f} GB/s with "
                      f"threads={report['args']['threads']} (batch-1 decode reads every weight once per token)")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def draw_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r]
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in ((axes[0], "decode_tps", "batch-1 decode (tokens/s)"),
                           (axes[1], "prefill_tps", "prefill, 256-token prompt (tokens/s)")):
        for i, impl in enumerate(impls):
            vals = [next((r.get(key) or 0 for r in rows if (r["model"], r["dtype"]) == g and r["impl"] == impl), 0)
                    for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], vals, width, label=impl)
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{m.split(' ')[0]}\n{d}" for m, d in groups], fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"minimind bench on {report['machine']['cpu']} ({report['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small,base,default", help="comma list of small, base, default, or paths")
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="comma list of fp32, bf16, int8, dynamic")
    p.add_argument("--peers", default="transformers,llama.cpp", help="comma list (empty for none)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--peer-concurrency", default="1,8", help="concurrency levels for transformers (slow)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of prefill and decode per implementation (best of)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    p.add_argument("--chat-turns", type=int, default=10, help="multi-turn TTFT with/without prefix cache (0 = off)")
    p.add_argument("--no-chat-memory", dest="chat_memory", action="store_false",
                   help="skip the single-chat peak RSS measurement (one more subprocess per model and dtype)")
    p.add_argument("--tokenizer", help="tokenizer folder for the random-weight presets (needed for the GGUF)")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--png", default="bench.png")
    p.add_argument("--server", action="store_true", help="benchmark over HTTP instead: `minimind serve` against "
                   "llama-server with concurrent streaming clients (see `minimind bench --server --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker_loop(argv[1], json.loads(argv[2]))
        return 0
    if "--server" in argv:
        from .bench_server import main as server_main

        return server_main([a for a in argv if a != "--server"])
    args = build_parser().parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.peers = [p for p in args.peers.split(",") if p]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.peer_concurrency = [int(c) for c in args.peer_concurrency.split(",") if c]
    report = run(args)
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2))
    draw_chart(report, Path(args.png))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
