"""`minimind bench`: batch-1 prefill and decode tokens/s of our engine against transformers `generate` and
llama.cpp (llama-cpp-python, when installed; or its `llama-bench` binary, which has no Python overhead) on the
same weights, quoted as ratios.

Each implementation runs in a process of its own (its own threads, its own peak RSS), and those of one (model,
dtype) stay loaded side by side and take turns round by round: a shared machine's speed drifts within minutes,
so measuring one implementation after the other would compare different minutes. Timings are the best of
--repeats. The server load test (concurrent streaming clients, llama-server) is benchmarks/serve_load.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..checkpoint.spec import ModelSpec

MODELS = {"small": "minimind2-small", "base": "minimind2", "default": None}  # None = the embedded model
# gguf: a GGUF file's own tensor types (quantized blocks run as stored), llama.cpp on the same file
DTYPES = ("fp32", "bf16", "int8", "int4", "dynamic", "gguf")
# llama.cpp's precision matched to ours (int4: our Q4_K blocks made at load; Q4_K_M keeps a few tensors in Q6_K)
LLAMA_TYPES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_k_m"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # int8 and dynamic load fp32 weights and quantize them
SHARED_TOKENIZER = Path(__file__).resolve().parents[3].parent / "shared" / "minimind-tokenizers" / "minimind2"


# ---------------------------------------------------------------- the implementations, one process each
def prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


class Ours:
    def __init__(self, a: dict):
        from minimind.engine import LLM, SamplingParams

        kw = {"dtype": TORCH_DTYPES[a["dtype"]]} if a["dtype"] in TORCH_DTYPES else \
            {} if a["dtype"] == "gguf" else {"quantization": a["dtype"]}
        self.llm = LLM(a["model"], max_num_seqs=1, max_model_len=max(a["prompt_len"], 32) + a["decode_tokens"] + 8,
                       threads=a["threads"], max_num_batched_tokens=max(512, a["prompt_len"]), compile=a["compile"],
                       **kw)
        self.params, self.vocab = SamplingParams, self.llm.config.vocab_size

    def _metrics(self, ids: list[int], new: int) -> dict:  # perf_counter times: arrival, first_token, finished
        return self.llm.generate([ids], self.params(temperature=0, max_tokens=new, ignore_eos=True))[0].metrics

    def prefill(self, ids: list[int]) -> float:
        m = self._metrics(ids, 1)
        return m["first_token"] - m["arrival"]

    def decode(self, ids: list[int], n: int) -> float:
        m = self._metrics(ids, n)
        return m["finished"] - m["first_token"]


class Transformers:
    def __init__(self, a: dict):
        import torch

        from minimind import load_model

        torch.set_num_threads(a["threads"])
        self.model = load_model(a["model"], dtype=TORCH_DTYPES.get(a["dtype"], "float32"))
        if a["dtype"] in ("int8", "dynamic"):  # torch's dynamic int8 quantization of every Linear
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.vocab = self.model.config.vocab_size

    def prefill(self, ids: list[int], new: int = 1) -> float:
        import torch

        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.no_grad():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> float:  # generate() gives no first-token time: less a 1-token run
        return self.prefill(ids, n) - self.prefill(ids)


class LlamaCpp:
    def __init__(self, a: dict):
        from llama_cpp import Llama

        self.llm = Llama(a["gguf"], n_ctx=a["prompt_len"] + a["decode_tokens"] + 16, n_batch=512,
                         n_threads=a["threads"], n_threads_batch=a["threads"], verbose=False)
        self.vocab = self.llm.n_vocab()

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> float:
        import numpy as np

        self.prefill(ids)
        t = time.perf_counter()
        for _ in range(n - 1):  # greedy, one token per eval, as our batch-1 decode
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return time.perf_counter() - t


class LlamaBench:
    """llama.cpp's own benchmark binary on the same GGUF (`llama-bench -p P -n N`, one repetition per round):
    llama.cpp's speed without llama-cpp-python's per-token Python loop. It times its own prompt and its own
    generation from position 0; the prompt ids are not passed on."""

    def __init__(self, a: dict):
        self.binary, self.gguf, self.threads = a["llama_bench"], a["gguf"], a["threads"]
        self.vocab = 1000  # for the worker's prompts, which llama-bench does not read
        self.children_rss_mb = 0.0

    def tokens_per_s(self, prompt_len: int, gen: int) -> float:
        import resource
        import subprocess

        cmd = [self.binary, "-m", self.gguf, "-t", str(self.threads), "-p", str(prompt_len), "-n", str(gen),
               "-r", "1", "-o", "json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
        self.children_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return json.loads(done.stdout)[0]["avg_ts"]

    def prefill(self, ids: list[int]) -> float:
        return len(ids) / self.tokens_per_s(len(ids), 0)

    def decode(self, ids: list[int], n: int) -> float:
        return (n - 1) / self.tokens_per_s(0, n - 1)


IMPLS = {"minimind": Ours, "transformers": Transformers, "llama.cpp": LlamaCpp, "llama-bench": LlamaBench}
GGUF_PEERS = ("llama.cpp", "llama-bench")  # peers that run the GGUF file of the same weights


def worker(kind: str, a: dict, conn) -> None:
    """Loads one implementation, then answers each round number with (prefill tok/s, decode tok/s) and None with
    its peak RSS in MB; ("error", why) when something fails. Fresh prompts every round: no prefix-cache hit."""
    try:
        impl, n = IMPLS[kind](a), a["decode_tokens"]
        impl.decode(prompt(32, impl.vocab, 0), 16)  # warm-up
        conn.send("ready")
        while (r := conn.recv()) is not None:
            conn.send((a["prompt_len"] / impl.prefill(prompt(a["prompt_len"], impl.vocab, 100 + r)),
                       (n - 1) / impl.decode(prompt(32, impl.vocab, 200 + r), n)))  # first token excluded
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it could be the parent's peak; llama-bench
        # runs as this worker's child: its peak is the largest child's
        conn.send(getattr(impl, "children_rss_mb", None) or int(proc_field("/proc/self/status", "VmHWM").split()[0])
                  / 1024)
    except Exception as exc:  # noqa: BLE001 - reported as this implementation's error; the others go on
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def proc_field(path: str, key: str) -> str | None:  # /proc text files have "key<tabs>: value" lines
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return next((value.strip() for name, _, value in (line.partition(":") for line in lines)
                 if name.strip() == key), None)


# ---------------------------------------------------------------- orchestration
def measure(impls: list[str], a: dict) -> dict[str, dict]:
    """-> {impl: {prefill_tps, decode_tps, peak_rss_mb} or {error}}, best of a["repeats"] rounds; in each round
    the implementations take turns (the first one rotates)."""
    import multiprocessing

    ctx, procs, out = multiprocessing.get_context("spawn"), {}, {impl: {} for impl in impls}

    def ask(impl: str, message):
        conn = procs[impl][0]
        try:
            if message != "start":
                conn.send(message)
            answer = conn.recv()
        except (OSError, EOFError):  # the process died (out of memory, a crash in native code)
            procs[impl][1].join(10)
            answer = ("error", f"worker exited with code {procs[impl][1].exitcode}")
        if isinstance(answer, tuple) and answer[0] == "error":
            out[impl] = {"error": answer[1]}
            return None
        return answer

    try:
        for impl in impls:
            conn, child = ctx.Pipe()
            procs[impl] = (conn, ctx.Process(target=worker, args=(impl, a, child), daemon=True))
            procs[impl][1].start()
            child.close()  # the worker's end lives in the worker only: its death ends our recv() with EOFError
            ask(impl, "start")
        for r in range(a["repeats"]):
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                if "error" not in out[impl] and (tps := ask(impl, r)) is not None:
                    for key, value in zip(("prefill_tps", "decode_tps"), tps):
                        out[impl][key] = max(out[impl].get(key, 0.0), value)
        for impl in impls:
            if "error" not in out[impl] and (rss := ask(impl, None)) is not None:
                out[impl]["peak_rss_mb"] = rss
        return out
    finally:
        for _, proc in procs.values():
            proc.kill()
            proc.join()


def prepare_model(name: str, workdir: Path, tokenizer: Path | None) -> tuple[str, str]:
    """-> (label, path). A random-weight preset is saved once, so every worker loads the same weights."""
    if name == "default":
        from minimind.checkpoint.default_model import default_model_dir

        return "SmolLM2-135M (default)", str(default_model_dir())
    if name == "default-gguf":  # the file the default model ships as
        from minimind.checkpoint.default_model import find_default_gguf

        return "SmolLM2-135M Q4_1 GGUF (default)", str(find_default_gguf())
    if name not in MODELS:  # a checkpoint path
        return Path(name).name, name
    import torch

    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM

    torch.manual_seed(0)
    MiniMindForCausalLM(MiniMindConfig.from_preset(MODELS[name])).save_pretrained(workdir / name)
    for f in tokenizer.iterdir() if tokenizer else ():  # the GGUF export needs a tokenizer
        if f.is_file():
            shutil.copy(f, workdir / name / f.name)
    return f"{MODELS[name]} (random)", str(workdir / name)


def run(args) -> dict:
    import importlib.util

    notes, rows, gguf_peers = [], [], []
    if "llama.cpp" in args.peers:
        if importlib.util.find_spec("llama_cpp") is not None:
            gguf_peers.append("llama.cpp")
        else:
            notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install 'minimind[llamacpp]')")
    if "llama-bench" in args.peers:
        if args.llama_bench and shutil.which(args.llama_bench):
            gguf_peers.append("llama-bench")
        else:
            notes.append("llama-bench skipped: no llama-bench binary (put it on PATH or pass --llama-bench PATH; "
                         "benchmarks/README.md builds it)")
    llama = bool(gguf_peers)
    spec = ModelSpec.from_args(args)
    tokenizer = Path(spec.tokenizer) if spec.tokenizer else (SHARED_TOKENIZER if SHARED_TOKENIZER.is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="minimind-bench-") as tmp:
        for name in args.models:
            label, path = prepare_model(name, Path(tmp), tokenizer)
            for dtype in args.dtypes:
                a = {"model": path, "dtype": dtype, "threads": args.threads, "prompt_len": args.prompt_len,
                     "decode_tokens": args.decode_tokens, "repeats": args.repeats, "compile": args.compile,
                     "llama_bench": args.llama_bench and shutil.which(args.llama_bench)}
                impls = ["minimind"] + (["transformers"] if "transformers" in args.peers and dtype != "int4" else [])
                if dtype == "int4" and "transformers" in args.peers:
                    notes.append(f"{label} int4: transformers has no int4 path (skipped)")
                if dtype == "gguf" and not path.endswith(".gguf"):
                    notes.append(f"{label}: dtype gguf is for .gguf files (skipped)")
                    continue
                if llama and dtype == "gguf":
                    a["gguf"] = path
                    impls += gguf_peers
                elif llama and dtype in LLAMA_TYPES:
                    try:
                        from minimind.convert import export_gguf

                        gguf = Path(tmp) / f"{Path(path).name}-{LLAMA_TYPES[dtype]}.gguf"
                        if not gguf.exists():
                            export_gguf(path, gguf, outtype=LLAMA_TYPES[dtype], show_progress=False)
                        a["gguf"] = str(gguf)
                        impls += gguf_peers
                    except Exception as exc:  # noqa: BLE001 - e.g. no tokenizer for a random preset
                        notes.append(f"llama.cpp skipped for {label} {dtype}: GGUF export failed ({exc})")
                print(f"  {label} {dtype}: {', '.join(impls)} ...", file=sys.stderr, flush=True)
                rows += [{"model": label, "dtype": dtype, "impl": k, **v} for k, v in measure(impls, a).items()]
    machine = {"cpu": proc_field("/proc/cpuinfo", "model name") or "?", "cores": os.cpu_count(),
               "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return {"machine": machine, "args": vars(args), "notes": notes, "results": rows}


# ---------------------------------------------------------------- reporting
def ratios(rows: list[dict], row: dict) -> list[float | None]:
    """[prefill, decode] of ours over this row's implementation (same model and dtype); None on our own row."""
    same = (row["model"], row["dtype"], "minimind")
    ours = next((r for r in rows if (r["model"], r["dtype"], r["impl"]) == same), {})
    return [ours[k] / row[k] if row["impl"] != "minimind" and ours.get(k) and row.get(k) else None
            for k in ("prefill_tps", "decode_tps")]


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    a, m = report["args"], report["machine"]
    table = Table(title=f"minimind bench: batch-1 tokens/s, best of {a['repeats']} (prompt {a['prompt_len']}, "
                        f"{a['decode_tokens']} decoded, {a['threads']} threads; {m['cpu']}, {m['cores']} cores)")
    for col in ("model", "dtype", "impl", "prefill", "decode", "ours/this prefill", "ours/this decode", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("model", "dtype", "impl") else "right")
    for r in report["results"]:
        cells = [f"[red]{escape(r['error'][:100])}"] if "error" in r else [
            "-" if v is None else f"{v:,.{d}f}" for v, d in zip(
                [r.get("prefill_tps"), r.get("decode_tps"), *ratios(report["results"], r), r.get("peak_rss_mb")],
                (0, 0, 2, 2, 0))]
        table.add_row(r["model"], r["dtype"], r["impl"], *cells)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def draw_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r]
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(r["model"], r["dtype"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in ((axes[0], "decode_tps", "batch-1 decode (tokens/s)"),
                           (axes[1], "prefill_tps", f"prefill, {report['args']['prompt_len']}-token prompt (tokens/s)")):
        for i, impl in enumerate(impls):
            ax.bar([x + i * width for x in range(len(groups))],
                   [value.get((*g, impl), {}).get(key) or 0 for g in groups], width, label=impl)
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{m.split(' ')[0]}\n{d}" for m, d in groups], fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"minimind bench, {report['machine']['cpu']} ({report['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def comma_list(value: str) -> list[str]:
    return [x for x in value.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=comma_list, default="small,base,default", help="comma list of small, base, "
                   "default, default-gguf (the Q4_1 file it ships as), or paths (small/base: random weights of the "
                   "MiniMind2-Small / MiniMind2 shape)")
    p.add_argument("--dtypes", type=comma_list, default="fp32,bf16,int8", help="comma list of fp32, bf16, int8, "
                   "int4, dynamic (llama.cpp: F32 / F16 / Q8_0 / Q4_K_M / none; transformers has no int4), gguf (a "
                   ".gguf model's own types, both sides)")
    p.add_argument("--peers", type=comma_list, default="transformers,llama.cpp", help="comma list of transformers, "
                   "llama.cpp (llama-cpp-python), llama-bench (llama.cpp's benchmark binary); empty for ours only")
    p.add_argument("--llama-bench", metavar="PATH", default="llama-bench",
                   help="the llama-bench binary of the llama-bench peer (default: found on PATH)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens of the prefill measurement")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of the decode measurement")
    p.add_argument("--repeats", type=int, default=5, help="rounds per implementation (best of)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    p.add_argument("--json", metavar="FILE", help="also write every number and the machine as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a chart (needs matplotlib)")
    ModelSpec.add_arguments(p, only=("tokenizer",), title="model", helps={
        "tokenizer": "tokenizer folder for the random-weight presets (needed for the GGUF)"})
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if bad := [d for d in args.dtypes if d not in DTYPES]:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if bad := [x for x in args.peers if x not in IMPLS or x == "minimind"]:
        p.error(f"unknown peer(s) {', '.join(bad)}; choose from {', '.join(k for k in IMPLS if k != 'minimind')}")
    if min(args.repeats, args.threads, args.prompt_len, args.decode_tokens - 1) < 1:
        p.error("--repeats, --threads and --prompt-len must be >= 1, --decode-tokens >= 2")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("minimind bench: --plot needs matplotlib: pip install 'minimind[bench]'", file=sys.stderr)
            return 2
    report = run(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        draw_chart(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
