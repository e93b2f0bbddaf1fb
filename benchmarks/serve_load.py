"""Server load test: N concurrent streaming completions against `minimind serve` and llama-server on the same
weights, optionally also our engine alone (in a process of its own, no HTTP), all on 127.0.0.1.

For each dtype and client count N, `minimind serve --max-num-seqs N` and `llama-server --parallel N` (on a GGUF
written by `minimind convert --to gguf`: F32 for fp32, F16 for bf16, Q8_0 for int8) are started side by side
with the same thread count and warmed up; then they take turns round by round, so a busy neighbour on a shared
machine disturbs all of them alike. A round: N clients each stream one request at once (stream_client.py) with
the same random token-id prompts for every implementation (fresh ones every round). Reported per N: aggregate
tokens/s (the median round), TTFT p50/p95 and ITL p50 over all requests, ours / llama-server.
Usage and the reasons behind the choices: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from stream_client import StreamClient, summarize

SERVE, LLAMA, ENGINE = "minimind serve", "llama-server", "engine alone"
SERVE_FLAGS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantization", "int8"]}
GGUF_TYPES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}
MODEL_ID = "bench"
# a process that just finished a round still burns CPU for a few ms (OpenMP threads spin before they sleep,
# llama.cpp's threads poll); the pause keeps that off the start of the next implementation's round
ROUND_PAUSE = 0.1


def round_prompts(n: int, length: int, vocab: int, r: int) -> list[list[int]]:
    rng = random.Random(1000 * n + r)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------- the engine alone (`--engine-worker` process)
def engine_worker() -> None:
    """Reads a JSON config line, then round numbers; answers each round with its requests' times. Configured as
    `minimind serve` configures its engine (same prompt chunk size)."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the engine's libraries print goes to stderr: stdout carries only answers
    from minimind.engine import LLM, SamplingParams
    from minimind.serve.launch import SERVE_BATCHED_TOKENS

    a = json.loads(sys.stdin.readline())
    kw = {"quantization": "int8"} if a["dtype"] == "int8" else {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[a["dtype"]]}
    llm = LLM(a["model"], max_num_seqs=a["n"], max_model_len=a["max_model_len"], threads=a["threads"],
              max_num_batched_tokens=SERVE_BATCHED_TOKENS, **kw)
    params = SamplingParams(temperature=a["temperature"], top_p=1.0, top_k=0, min_p=0.0, max_tokens=a["tokens"],
                            ignore_eos=True)
    for line in sys.stdin:
        outs = llm.generate(round_prompts(a["n"], a["prompt_len"], a["vocab"], int(line)), params)
        print(json.dumps([{"start": o.metrics["arrival"], "first": o.metrics["first_token"], "end": o.metrics["finished"],
                           "tokens": len(o.outputs[0].token_ids), "chunks": 0} for o in outs]), file=reply, flush=True)


class Engine:
    def __init__(self, cmd: list[str], config: dict, env: dict, log: Path):
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, start_new_session=True)
        self.proc.stdin.write(json.dumps(config) + "\n")

    def run_round(self, r: int) -> list[dict]:
        self.proc.stdin.write(f"{r}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine worker exited; see {self.log.name}")
        return json.loads(line)

    def stop(self) -> None:
        _stop(self.proc)
        self.log.close()


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict, log: Path, n: int, timeout: float):
        self.name, self.log = name, log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline, url = time.monotonic() + timeout, f"http://127.0.0.1:{port}"
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {self.proc.returncode}: {log.read_text()[-800:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer /health within {timeout:.0f} s; see {log}")
                time.sleep(0.5)
        except BaseException:  # Ctrl-C included: a server that never came up is stopped too
            _stop(self.proc)
            raise
        self.client, self.cpu = StreamClient(url, MODEL_ID), 0.0

    def run_round(self, prompts, tokens: int, temperature: float) -> list[dict]:
        """The round's requests; self.cpu adds up the client's CPU seconds (it shares the machine)."""
        cpu = time.process_time()
        try:
            return self.client.run_round(prompts, tokens, temperature)
        finally:
            self.cpu += time.process_time() - cpu

    def stop(self) -> None:
        self.client.close()
        _stop(self.proc)


# ---------------------------------------------------------------- one client count
def measure(n: int, dtype: str, model: str, gguf: str | None, vocab: int, args, work: Path) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.minimind_src:  # that source tree's minimind, for serve and the engine alone
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.minimind_src) / "src"), env.get("PYTHONPATH", "")])
    ctx = args.prompt_len + args.tokens + 16
    results, rounds, impls = {}, {}, {}
    try:
        if args.engine:
            impls[ENGINE] = Engine([args.python, __file__, "--engine-worker"],
                                   {"model": model, "dtype": dtype, "n": n, "max_model_len": ctx, "threads": args.threads,
                                    "temperature": args.temperature, "tokens": args.tokens, "prompt_len": args.prompt_len,
                                    "vocab": vocab}, env, work / f"engine-{dtype}-{n}.log")
        port = free_port()
        impls[SERVE] = Server(SERVE, [*shlex.split(args.minimind_cmd), "serve", "--model", model, *SERVE_FLAGS[dtype],
                                      "--threads", str(args.threads), "--max-num-seqs", str(n), "--max-model-len",
                                      str(ctx), "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port",
                                      str(port), "--log-level", "warning", *shlex.split(args.serve_args)],
                              port, env, work / f"serve-{dtype}-{n}.log", n, args.startup_timeout)
        if gguf:
            port = free_port()
            impls[LLAMA] = Server(LLAMA, [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                                          "-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(n),
                                          "-c", str(n * ctx), "-a", MODEL_ID, "--no-webui"],
                                  port, env, work / f"llama-{dtype}-{n}.log", n, args.startup_timeout)
        for impl in impls.values():  # warm-up (round -1, 16 tokens)
            if isinstance(impl, Server):
                impl.run_round(round_prompts(n, args.prompt_len, vocab, -1), 16, args.temperature)
                impl.cpu = 0.0
            else:
                impl.run_round(-1)
        for r in range(args.repeats):
            print(f"  {dtype} x{n}: round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for name, impl in impls.items():
                time.sleep(ROUND_PAUSE)
                rounds.setdefault(name, []).append(
                    impl.run_round(r) if isinstance(impl, Engine) else
                    impl.run_round(round_prompts(n, args.prompt_len, vocab, r), args.tokens, args.temperature))
        results = {name: summarize(rr) for name, rr in rounds.items()}
        for name, impl in impls.items():
            if isinstance(impl, Server):
                tokens = sum(r["tokens"] or r["chunks"] for rr in rounds[name] for r in rr)
                results[name]["client_cpu_us_per_token"] = 1e6 * impl.cpu / max(tokens, 1)
    finally:
        for impl in impls.values():
            impl.stop()
    return results


# ---------------------------------------------------------------- model, report, command line
def prepare(args, work: Path) -> tuple[str, dict[str, str], int]:
    """-> (model folder, {dtype: GGUF path}, vocab size). Kept in --workdir, so runs with other source trees
    serve the very same weights."""
    model = Path(args.model)
    if args.model in ("small", "base"):
        model = work / args.model
        if not (model / "config.json").exists():
            from minimind.apps.bench import SHARED_TOKENIZER, prepare_model

            tokenizer = Path(args.tokenizer) if args.tokenizer else SHARED_TOKENIZER
            prepare_model(args.model, work, tokenizer if tokenizer.is_dir() else None)
    ggufs = {}
    for dtype in args.dtypes if args.llama_server else ():
        out = work / f"{model.name}-{GGUF_TYPES[dtype]}.gguf"
        if not out.exists():
            subprocess.run([sys.executable, "-m", "minimind", "convert", "--to", "gguf", "--outtype",
                            GGUF_TYPES[dtype], "--no-progress", str(model), str(out)], check=True)
        ggufs[dtype] = str(out)
    return str(model), ggufs, int(json.loads((model / "config.json").read_text())["vocab_size"])


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    a = report["args"]
    table = Table(title=f"{a['model']}: {a['tokens']} tokens per request, {a['prompt_len']}-token prompts, "
                        f"{a['threads']} threads, {a['repeats']} rounds ({report['machine']})")
    for col in ("dtype", "clients", "impl", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ours / llama-server"):
        table.add_column(col, justify="left" if col in ("dtype", "impl") else "right")
    for row in report["results"]:
        ratio = row.get("x_llama")
        table.add_row(row["dtype"], str(row["clients"]), row["impl"], *(
            "-" if v is None else f"{v:,.{d}f}" for v, d in ((row["tok_s"], 0), (row["ttft_p50_ms"], 0),
                                                             (row["ttft_p95_ms"], 0), (row["itl_p50_ms"], 1),
                                                             (ratio, 2))))
    Console(width=max(Console().width, 130)).print(table)
    cpu = [r["client_cpu_us_per_token"] for r in report["results"] if r.get("client_cpu_us_per_token")]
    if cpu:
        print(f"the client's own CPU: {min(cpu):.0f}-{max(cpu):.0f} us per token (on the same machine)")
    for note in report["notes"]:
        print(f"note: {note}")


def draw_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (dtype, impl) in dict.fromkeys((r["dtype"], r["impl"]) for r in report["results"]):
        rows = [r for r in report["results"] if (r["dtype"], r["impl"]) == (dtype, impl)]
        for ax, key in zip(axes, ("tok_s", "ttft_p50_ms")):
            ax.plot([r["clients"] for r in rows], [r[key] for r in rows], marker="o", label=f"{impl} {dtype}")
    for ax, title in zip(axes, ("aggregate tokens/s", "TTFT p50 (ms)")):
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['args']['model']}, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if sys.argv[1:] == ["--engine-worker"]:
        engine_worker()
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="small / base (random weights of the MiniMind2-Small / "
                   "MiniMind2 shape, made once in --workdir) or a checkpoint folder with config.json and a tokenizer")
    p.add_argument("--dtypes", default="bf16,int8", help="comma list of fp32, bf16, int8")
    p.add_argument("--clients", default="1,8,32", help="comma list of concurrent streaming clients")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    p.add_argument("--prompt-len", type=int, default=32, help="random token-id prompt length")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; not greedy: greedy "
                   "decoding of random weights often repeats a partial UTF-8 character, which servers hold back")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds per client count, after a warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every server and engine")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"),
                   metavar="PATH", help="llama-server binary (default $LLAMA_SERVER, then PATH); none: ours only")
    p.add_argument("--engine", action="store_true", help="also measure our engine alone (no HTTP)")
    p.add_argument("--minimind-src", metavar="DIR", help="a minimind source tree (DIR/src goes first on PYTHONPATH) "
                   "to serve instead of the installed minimind, e.g. an older commit's worktree")
    p.add_argument("--minimind-cmd", default=f"{shlex.quote(sys.executable)} -m minimind",
                   help="the command that runs minimind (default: this interpreter's -m minimind)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the engine-alone worker")
    p.add_argument("--serve-args", default="", help="more `minimind serve` flags, e.g. '--stream-interval 4'")
    p.add_argument("--tokenizer", help="tokenizer folder for small/base (the GGUF needs one)")
    p.add_argument("--workdir", help="keeps the model and GGUF files between runs (default: a temporary folder)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server gets to answer /health")
    p.add_argument("--json", metavar="FILE", help="also write every number (and every round) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw tokens/s and TTFT against clients (matplotlib)")
    args = p.parse_args()
    args.dtypes, args.clients = args.dtypes.split(","), [int(c) for c in args.clients.split(",")]
    if bad := [d for d in args.dtypes if d not in SERVE_FLAGS]:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(SERVE_FLAGS)}")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        p.error(f"--llama-server {args.llama_server} is not an executable (see benchmarks/README.md to build it)")
    notes = [] if args.llama_server else ["llama-server not found (--llama-server, $LLAMA_SERVER or PATH): ours only"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: every server is stopped
    rows = []
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
        work.mkdir(parents=True, exist_ok=True)
        model, ggufs, vocab = prepare(args, work)
        for dtype in args.dtypes:
            for n in args.clients:
                try:
                    res = measure(n, dtype, model, ggufs.get(dtype), vocab, args, work)
                except (RuntimeError, OSError) as exc:  # this cell failed (its servers are stopped): the rest go on
                    notes.append(f"{dtype} x{n}: {exc}")
                    continue
                for impl, r in res.items():
                    x = r["tok_s"] / res[LLAMA]["tok_s"] if impl == SERVE and LLAMA in res else None
                    rows.append({"dtype": dtype, "clients": n, "impl": impl, **r, "x_llama": x})
                    if r["tokens"] != [args.tokens]:
                        notes.append(f"{impl} {dtype} x{n} returned {r['tokens']} tokens per request, not "
                                     f"{args.tokens}: its numbers are not comparable")
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else ["?"]
    machine = f"{cpu[0]}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    report = {"machine": machine, "args": vars(args), "notes": notes, "results": rows}
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        draw_chart(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
