"""`minimind bench --server`: aggregate tokens/s and TTFT p50/p99 of concurrent streaming clients over HTTP,
`minimind serve` side by side with llama-server on the same weights, plus the HTTP overhead against our engine.

For each model, dtype and client count N, three subprocesses are started together on 127.0.0.1 with the same
thread count: our engine in-process (`LLM.generate` of N prompts at once, no HTTP), `minimind serve
--max-num-seqs N` and llama-server `--parallel N` (on our own GGUF export of the same weights: F16 for bf16,
Q8_0 for int8, F32 for fp32). After a warm-up each runs --repeats rounds, taking turns round by round so a busy
neighbour disturbs all alike. A round: N clients each stream one /v1/completions request at once (plain
HTTP/1.1 on connections kept alive from round to round, as SDK clients keep theirs; reading in batches after the
first token: bench_client), with the same random token-id prompts for every
implementation, a fixed number of generated tokens (`ignore_eos`) and plain sampling (--temperature 1). Reported:
the best round's aggregate tokens/s and its TTFT (to the first chunk with text) p50/p99, and the HTTP cost as the
median of round-by-round ratios to the engine (http_cost); the JSON keeps every round. The machine is shared:
quote ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..serve.launch import SERVE_BATCHED_TOKENS
from . import bench
from .bench_client import Pool, run_round, summarize
from .bench_http import (
    LineWorker,
    ServerProcess,
    find_llama_server,
    free_port,
    llama_server_version,
    percentile,
)
from .bench_server_report import ENGINE, LLAMA, SERVE, draw_chart, print_table
from .bench_workers import engine_kwargs, prompts

SERVE_FLAGS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantization", "int8"],
               "dynamic": ["--quantization", "dynamic"]}
MODEL_ID = "bench"
WARMUP_TOKENS = 16
# A pause before each round: the previous round's implementation still burns CPU after its last token (libgomp's
# threads spin ~12 ms after their last parallel region, llama.cpp's threads poll), which would fall on the first
# milliseconds (the prompt phase) of whichever round comes next in the fixed order (docs/benchmarks.md, "Fifteenth
# session").
ROUND_PAUSE = 0.1

BUILD_HELP = """llama-server (the peer) is found as --llama-server PATH, $LLAMA_SERVER, or `llama-server` on PATH;
without it the peer is skipped with a note. Build it outside the repository from the llama.cpp that
llama-cpp-python 0.3.36 vendors (needs cmake, ninja, a C++17 compiler; ~25 min on 2 busy cores):

  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d ~/llama-build
  tar xzf ~/llama-build/llama_cpp_python-0.3.36.tar.gz -C ~/llama-build
  cmake -S ~/llama-build/llama_cpp_python-0.3.36/vendor/llama.cpp -B ~/llama-build/build -G Ninja \\
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \\
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
  nice -n 19 cmake --build ~/llama-build/build --target llama-server -j2
  export LLAMA_SERVER=~/llama-build/build/bin/llama-server

examples:
  minimind bench --server --models small --threads 2                  # bf16 vs F16, int8 vs Q8_0 at 1/8/32 clients
  minimind bench --server --dtypes int8 --concurrency 1,4 --repeats 1 --peers ''   # ours only, quick
"""


# ---------------------------------------------------------------- the engine without HTTP (its own subprocess)
def _round_prompts(n: int, prompt_len: int, vocab: int, r: int) -> list[list[int]]:
    """The prompts of round r at N clients: identical for every implementation, fresh for every round."""
    return prompts(n, prompt_len, vocab, 1000 * n + r + 7)


def worker_engine(a: dict, rounds, reply) -> None:
    """Our engine without HTTP, configured as `minimind serve` configures it: after a warm-up it answers
    `ready`, then runs one round (N prompts submitted at once) per round number read from `rounds`."""
    from minimind.engine import LLM, SamplingParams

    n = a["n"]
    llm = LLM(a["model"], max_num_seqs=n, max_model_len=a["max_model_len"], threads=a["threads"],
              max_num_batched_tokens=SERVE_BATCHED_TOKENS, **engine_kwargs(a["dtype"]))
    vocab = llm.config.vocab_size
    llm.generate(prompts(n, a["prompt_len"], vocab, 1),
                 SamplingParams(temperature=a["temperature"], max_tokens=WARMUP_TOKENS, ignore_eos=True))
    reply({"ready": True})
    full = SamplingParams(temperature=a["temperature"], top_p=1.0, top_k=0, min_p=0.0, max_tokens=a["decode_tokens"],
                          ignore_eos=True)
    for r in rounds:
        outs = llm.generate(_round_prompts(n, a["prompt_len"], vocab, r), full)
        reply({"requests": [{"start": o.metrics["arrival"], "first": o.metrics["first_token"],
                             "end": o.metrics["finished"], "tokens": len(o.outputs[0].token_ids)} for o in outs]})


def _worker_main() -> int:
    """`python -m minimind.apps.bench_server --worker`: JSON lines on stdin/stdout. Anything else the engine or
    its libraries print goes to stderr, so stdout carries only replies."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    config = json.loads(sys.stdin.readline())
    worker_engine(config, (int(json.loads(line)) for line in sys.stdin if line.strip()), reply)
    return 0


class EngineWorker(LineWorker):
    def __init__(self, config: dict, log: Path, env: dict):
        super().__init__(ENGINE, [sys.executable, "-m", "minimind.apps.bench_server", "--worker"], log, env=env)
        self.config = config

    def ready(self) -> None:
        self.call(self.config)


# ---------------------------------------------------------------- the servers
def serve_cmd(path: str, dtype: str, n: int, port: int, args) -> list[str]:
    return [sys.executable, "-m", "minimind", "serve", "--model", path, *SERVE_FLAGS[dtype], "--threads",
            str(args.threads), "--max-num-seqs", str(n), "--max-model-len", str(args.max_model_len),
            "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            *(["--stream-interval", str(args.stream_interval)] if getattr(args, "stream_interval", 1) > 1 else [])]


def llama_cmd(exe: str, gguf: str, n: int, port: int, args) -> list[str]:
    return [exe, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads), "-tb",
            str(args.threads), "--parallel", str(n), "-c", str(n * args.max_model_len), "-a", MODEL_ID, "--no-webui"]


def measure_level(label: str, path: str, dtype: str, n: int, gguf: str | None, exe: str | None, vocab: int,
                  args, env: dict, tmp: Path, notes: list) -> dict[str, dict]:
    """Every implementation at N clients, started together (each warmed up), then measured round by round in
    turn (engine, ours, llama-server, engine, ...) so a busy neighbour disturbs all of them alike."""
    results: dict[str, dict] = {ENGINE: {}, SERVE: {}, **({LLAMA: {}} if gguf else {})}
    rounds: dict[str, list] = {impl: [] for impl in results}
    config = {"model": path, "dtype": dtype, "n": n, "threads": args.threads, "max_model_len": args.max_model_len,
              "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "temperature": args.temperature}

    def start(impl: str, stack: contextlib.ExitStack):
        if impl == ENGINE:
            return stack.enter_context(EngineWorker(config, tmp / f"engine-{dtype}-{n}.log", env))
        port = free_port()
        cmd = serve_cmd(path, dtype, n, port, args) if impl == SERVE else llama_cmd(exe, gguf, n, port, args)
        srv = stack.enter_context(ServerProcess(impl, cmd, tmp / f"{impl.split()[-1]}-{dtype}-{n}.log", port,
                                                env=env, ready_timeout=args.startup_timeout))
        srv.pool = Pool()  # the clients' connections, kept alive from round to round
        stack.callback(srv.pool.close)
        run_round(srv.base_url, MODEL_ID, prompts(n, args.prompt_len, vocab, 1), WARMUP_TOKENS,
                  args.temperature, srv.pool)
        return srv

    def one_round(child, r: int) -> list[dict]:
        time.sleep(ROUND_PAUSE)
        if isinstance(child, EngineWorker):
            return child.call(r)["requests"]
        return run_round(child.base_url, MODEL_ID, _round_prompts(n, args.prompt_len, vocab, r), args.decode_tokens,
                         args.temperature, child.pool)

    def fail(impl: str, exc: Exception) -> None:
        results[impl][f"error@{n}"] = " ".join(str(exc).split())[:400]
        notes.append(f"{label} {dtype} {impl} x{n}: {exc}")

    with contextlib.ExitStack() as stack:
        children = {}
        for impl in results:
            print(f"  {label} {dtype} x{n}: starting {impl}", file=sys.stderr, flush=True)
            try:
                children[impl] = start(impl, stack)
            except Exception as exc:  # noqa: BLE001 - one failed cell, the rest of the run goes on
                fail(impl, exc)
        for r in range(args.repeats):
            print(f"  {label} {dtype} x{n}: round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for impl, child in children.items():
                if f"error@{n}" not in results[impl]:
                    try:
                        rounds[impl].append(one_round(child, r))
                    except Exception as exc:  # noqa: BLE001
                        fail(impl, exc)
        for impl, child in children.items():
            if f"error@{n}" not in results[impl] and rounds[impl]:
                results[impl].update(summarize(rounds[impl], n))
                results[impl][f"peak_rss_mb@{n}"] = child.peak_rss_mb()
    return results


def round_costs(serve_rounds: list[float], engine_rounds: list[float]) -> list[float]:
    """Per-round HTTP cost in %: 1 - ours / engine, each of our rounds against the engine's round of the same
    turn (taken seconds before it)."""
    return [100 * (1 - s / e) for s, e in zip(serve_rounds, engine_rounds)]


def http_cost(serve_rounds: list[float], engine_rounds: list[float]) -> float:
    """HTTP cost in %: the median of round_costs. The machine's speed drifts 10-20 % within a minute on shared
    vCPUs; a ratio of the two best rounds compares different minutes (kept as http_overhead_best_pct)."""
    return percentile(round_costs(serve_rounds, engine_rounds), 50)


def _vocab_size(path: str) -> int:
    config = Path(path) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["vocab_size"])
    from minimind.checkpoint.loader import read_checkpoint

    return read_checkpoint(path)[0].vocab_size


def run(args) -> dict:
    notes: list[str] = []
    exe = None
    if "llama-server" in args.peers:
        exe, note = find_llama_server(args.llama_server)
        notes += [note] if note else []
    tokenizer = Path(args.tokenizer) if args.tokenizer else (
        bench.SHARED_TOKENIZER if bench.SHARED_TOKENIZER.is_dir() else None)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    machine = {**bench.machine(), "llama_server": llama_server_version(exe) if exe else None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="minimind-bench-server-") as tmp:
        tmp = Path(tmp)
        for name in args.models:
            label, path = bench._prepare_model(name, tmp, tokenizer)
            vocab = _vocab_size(path)
            for dtype in args.dtypes:
                gguf = None
                if exe and dtype not in bench.LLAMA_TYPES:
                    notes.append(f"llama-server skipped for {dtype}: no matching GGUF type")
                elif exe:
                    gguf = bench._gguf(path, dtype, tmp, notes)
                results: dict[str, dict] = {}
                for n in args.concurrency:
                    for impl, res in measure_level(label, path, dtype, n, gguf, exe, vocab, args, env, tmp,
                                                   notes).items():
                        results.setdefault(impl, {}).update(res)
                engine, ours = results[ENGINE], results[SERVE]
                for n in args.concurrency:
                    if engine.get(f"agg_tps@{n}") and ours.get(f"agg_tps@{n}"):
                        ours_r, engine_r = ours[f"rounds_tps@{n}"], engine[f"rounds_tps@{n}"]
                        ours[f"http_overhead_pct@{n}"] = http_cost(ours_r, engine_r)
                        ours[f"http_overhead_rounds_pct@{n}"] = round_costs(ours_r, engine_r)
                        ours[f"http_overhead_best_pct@{n}"] = 100 * (1 - max(ours_r) / max(engine_r))
                    if LLAMA in results and results[LLAMA].get(f"agg_tps@{n}") and ours.get(f"agg_tps@{n}"):
                        ours[f"x_llama@{n}"] = ours[f"agg_tps@{n}"] / results[LLAMA][f"agg_tps@{n}"]
                for impl, res in results.items():
                    shown = f"{impl} {bench.LLAMA_TYPES[dtype].upper()}" if impl == LLAMA else impl
                    rows.append({"model": label, "dtype": dtype, "impl": shown, **res})
    for r in rows:
        wrong = sorted({t for n in args.concurrency for t in r.get(f"completion_tokens@{n}", [])} - {args.decode_tokens})
        if wrong:
            notes.append(f"{r['model']} {r['dtype']} {r['impl']}: requests returned {wrong} tokens, not "
                         f"{args.decode_tokens}: its throughput is not comparable")
    return {"machine": machine, "args": vars(args), "notes": notes, "results": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind bench --server", description=__doc__.split("\n\n")[0],
                                epilog=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small", help="comma list of small, base, default, or checkpoint paths "
                   "(small/base: random weights of the MiniMind2-Small / MiniMind2 shape)")
    p.add_argument("--dtypes", default="bf16,int8", help="comma list of fp32, bf16, int8, dynamic (llama-server: "
                   "F32 / F16 / Q8_0 / none)")
    p.add_argument("--peers", default="llama-server", help="'llama-server' or '' for ours only")
    p.add_argument("--llama-server", metavar="PATH", help="llama-server binary (default $LLAMA_SERVER, then PATH)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every server and engine")
    p.add_argument("--concurrency", default="1,8,32", help="comma list of concurrent streaming clients")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    p.add_argument("--prompt-len", type=int, default=32, help="random token-id prompt length")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (top_k/top_p/min_p off). Not greedy by default: greedy decoding of "
                        "random weights often repeats a token that is part of a UTF-8 character, which servers hold "
                        "back, so the first text (TTFT) would arrive late or only at the end")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured rounds per client count (after one warm-up); the HTTP cost is the median of "
                        "per-round costs, so use 8-16 on a shared machine")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="passed to `minimind serve` (tokens per streamed chunk; llama-server sends every token)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server gets to answer /health")
    p.add_argument("--tokenizer", help="tokenizer folder for the random-weight presets (needed for the GGUF)")
    p.add_argument("--json", default="bench-server.json")
    p.add_argument("--png", default="bench-server.png")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.peers = [x for x in args.peers.split(",") if x]
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        p.error(f"--concurrency takes a comma list of integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs client counts >= 1")
    if bad := [d for d in args.dtypes if d not in SERVE_FLAGS]:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(SERVE_FLAGS)}")
    if bad := [x for x in args.peers if x != "llama-server"]:
        p.error(f"unknown peer(s) {', '.join(bad)}; the only peer is llama-server")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")
    if min(args.decode_tokens, args.prompt_len, args.repeats, args.threads) < 1:
        p.error("--decode-tokens, --prompt-len, --repeats and --threads must be >= 1")
    args.max_model_len = args.prompt_len + args.decode_tokens + 16
    return args


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C: every `with ServerProcess` stops its server
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main()
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("minimind bench --server: interrupted (servers stopped)", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2))
    draw_chart(report, Path(args.png))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
