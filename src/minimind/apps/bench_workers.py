"""The implementations `minimind bench` measures, one subprocess each: our engine, transformers `generate` and
llama.cpp (llama-cpp-python).

Each is a class that loads its model once and then answers measurements one at a time: `prefill(r)` and
`decode(r)` (round r's tokens/s) and `rest()` (everything else, once). The orchestrator keeps every worker of a
(model, dtype) alive and alternates the rounds between them, so a peer's number and ours come from the same
minutes: this machine's speed moves by up to 2x within minutes (other tenants share its cores), and measuring one
implementation after the other turned that into ratios off by 20-30 %.

Protocol (`python -m minimind.apps.bench --worker KIND ARGS_JSON`): the worker prints `ready` once loaded, then
reads lines `prefill R`, `decode R` (answers one JSON number each) and `rest` (answers the JSON dict and exits).
"""
from __future__ import annotations

import json
import os
import sys
import time

from .bench_memory import peak_rss_mb, worker_memory

# aggregate throughput at N sequences and each chat turn's TTFT: best of this many rounds (like prefill and decode,
# whose rounds alternate with the peers': one round's time moves with whatever else the machine's cores run then)
AGG_ROUNDS = 3


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def engine_kwargs(dtype: str) -> dict:
    """LLM keyword arguments for a bench dtype name."""
    if dtype in ("int8", "dynamic"):
        return {"quantization": dtype}
    return {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}


class Ours:
    def __init__(self, a: dict):
        from minimind.engine import LLM, SamplingParams

        self.a, self.kw = a, engine_kwargs(a["dtype"])
        self.llm = LLM(a["model"], max_num_seqs=max(a["concurrency"]),
                       max_model_len=max(a["prompt_len"], 32) + a["decode_tokens"] + 8, threads=a["threads"],
                       max_num_batched_tokens=max(512, a["prompt_len"]), compile=a["compile"], **self.kw)
        self.vocab = self.llm.config.vocab_size
        self.one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        self.full = SamplingParams(temperature=0, max_tokens=a["decode_tokens"], ignore_eos=True)
        self.llm.generate(prompts(1, 32, self.vocab, 0), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))

    def prefill(self, r: int) -> float:  # fresh random prompts every round: no prefix-cache hits
        out = self.llm.generate(prompts(1, self.a["prompt_len"], self.vocab, 100 + r), self.one)[0]
        return self.a["prompt_len"] / (out.metrics["first_token"] - out.metrics["arrival"])

    def decode(self, r: int) -> float:
        out = self.llm.generate(prompts(1, 32, self.vocab, 200 + r), self.full)[0]
        return (self.a["decode_tokens"] - 1) / (out.metrics["finished"] - out.metrics["first_token"])

    def rest(self) -> dict:
        a, llm = self.a, self.llm
        res = {"kv_cache_mb": llm.kv.nbytes / 2**20, "weights_mb": llm.runner.weight_bytes / 2**20}
        for n in a["concurrency"]:
            for r in range(AGG_ROUNDS):  # fresh prompts every round: no prefix-cache hits
                outs = llm.generate(prompts(n, 32, self.vocab, 300 + n + 1000 * r), self.full)
                start = min(o.metrics["arrival"] for o in outs)
                wall = max(o.metrics["finished"] for o in outs) - start
                if n * a["decode_tokens"] / wall > res.get(f"agg_tps@{n}", 0.0):  # the best round, with its TTFT
                    res[f"agg_tps@{n}"] = n * a["decode_tokens"] / wall
                    res[f"ttft_ms@{n}"] = 1000 * sum(o.metrics["first_token"] - o.metrics["arrival"] for o in outs) / n
        res["peak_rss_mb"] = peak_rss_mb()
        if a.get("chat_turns"):
            del self.llm, llm
            res.update(chat_ttft(a, self.kw, self.vocab))
        return res


def chat_ttft(a: dict, kw: dict, vocab: int) -> dict:
    """TTFT of turn 1 and turn N of a chat (20-token user turns, 32-token replies), prefix cache on and off: per
    turn the best of AGG_ROUNDS chats (different tokens each, so none reuses another's cache)."""
    from minimind.engine import LLM, SamplingParams

    turns, out = a["chat_turns"], {}
    reply = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for caching in (True, False):
        llm = LLM(a["model"], max_num_seqs=2, max_model_len=turns * 60 + 64, threads=a["threads"],
                  enable_prefix_caching=caching, **kw)
        ttft = [float("inf")] * turns
        for r in range(AGG_ROUNDS):
            conversation = []
            for i, user in enumerate(prompts(turns, 20, vocab, 400 + r)):
                prompt = conversation + user
                o = llm.generate(prompt, reply)[0]
                ttft[i] = min(ttft[i], 1000 * (o.metrics["first_token"] - o.metrics["arrival"]))
                conversation = prompt + o.outputs[0].token_ids
        tag = "cached" if caching else "uncached"
        out[f"chat_ttft_ms_turn1_{tag}"], out[f"chat_ttft_ms_turn{turns}_{tag}"] = ttft[0], ttft[-1]
    return out


class Transformers:
    def __init__(self, a: dict):
        import torch

        from minimind import load_model

        torch.set_num_threads(a["threads"])
        self.a = a
        self.model = load_model(a["model"], dtype={"fp32": "float32", "bf16": "bfloat16"}.get(a["dtype"], "float32"))
        if a["dtype"] in ("int8", "dynamic"):  # the seeds' path: torch.ao dynamic quantization of every Linear
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.vocab = self.model.config.vocab_size
        self._run(prompts(1, 32, self.vocab, 0), 8)

    def _run(self, batch: list[list[int]], new: int) -> float:
        import torch

        ids = torch.tensor(batch)
        t = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def prefill(self, r: int) -> float:
        return self.a["prompt_len"] / self._run(prompts(1, self.a["prompt_len"], self.vocab, 100 + r), 1)

    def decode(self, r: int) -> float:
        p = prompts(1, 32, self.vocab, 200 + r)
        return (self.a["decode_tokens"] - 1) / (self._run(p, self.a["decode_tokens"]) - self._run(p, 1))

    def rest(self) -> dict:
        res = {}
        for n in self.a["peer_concurrency"]:
            for r in range(AGG_ROUNDS):
                p = prompts(n, 32, self.vocab, 300 + n + 1000 * r)
                ttft = self._run(p, 1)
                agg = n * self.a["decode_tokens"] / self._run(p, self.a["decode_tokens"])
                if agg > res.get(f"agg_tps@{n}", 0.0):
                    res[f"agg_tps@{n}"], res[f"ttft_ms@{n}"] = agg, 1000 * ttft
        res["peak_rss_mb"] = peak_rss_mb()
        return res


class LlamaCpp:
    def __init__(self, a: dict):
        from llama_cpp import Llama

        self.a = a
        self.llm = Llama(a["gguf"], n_ctx=a["prompt_len"] + a["decode_tokens"] + 16, n_batch=512,
                         n_threads=a["threads"], n_threads_batch=a["threads"], verbose=False)
        self.vocab = self.llm.n_vocab()
        self._eval(prompts(1, 32, self.vocab, 0)[0])

    def _eval(self, prompt: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        return time.perf_counter() - t

    def prefill(self, r: int) -> float:
        return self.a["prompt_len"] / self._eval(prompts(1, self.a["prompt_len"], self.vocab, 100 + r)[0])

    def decode(self, r: int) -> float:
        import numpy as np

        self._eval(prompts(1, 32, self.vocab, 200 + r)[0])
        t = time.perf_counter()
        for _ in range(self.a["decode_tokens"] - 1):  # greedy, one token per eval, like our batch-1 decode
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return (self.a["decode_tokens"] - 1) / (time.perf_counter() - t)

    def rest(self) -> dict:
        return {"peak_rss_mb": peak_rss_mb()}


IMPLS = {"minimind": Ours, "transformers": Transformers, "llama.cpp": LlamaCpp}
METRICS = {"prefill": "prefill_tps", "decode": "decode_tps"}


def run_inline(kind: str, a: dict) -> dict:
    """All of one implementation's measurements in this process, its rounds back to back (no peer to alternate
    with): best of a["repeats"] for prefill and decode, then rest()."""
    if kind == "memory":
        return worker_memory(a)
    impl = IMPLS[kind](a)
    res = {key: max(getattr(impl, name)(r) for r in range(a["repeats"])) for name, key in METRICS.items()}
    return {**res, **impl.rest()}


def worker_loop(kind: str, a: dict) -> None:
    """The subprocess side of the protocol in the module docstring. Only protocol lines reach stdout: anything a
    library prints (Python or C) goes to stderr."""
    sys.stdout.flush()
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(obj) -> None:
        reply.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        reply.flush()

    if kind == "memory":  # one shot: its own process, its own peak
        say(worker_memory(a))
        return
    impl = IMPLS[kind](a)
    say("ready")
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "rest":
            say(impl.rest())
            return
        say(getattr(impl, cmd)(int(arg[0])))
