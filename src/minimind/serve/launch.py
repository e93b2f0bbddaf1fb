"""Command line of `minimind serve`: the seeds' model flags (shared with `minimind chat`), server flags, uvicorn."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from ..checkpoint.spec import ModelSpec
from ..errors import CheckpointError
from .limits import ServeLimits

# Tokens per engine step in the server: requests arrive spread over a few milliseconds, so the first step of a
# burst takes only the first prompts and the rest wait for it; smaller steps start them sooner. (`LLM` keeps 512
# for offline batches, which arrive at once.)
SERVE_BATCHED_TOKENS = 256


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _hosts(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per ServeLimits field (defaults from ServeLimits)."""
    d = ServeLimits()
    lim = p.add_argument_group("limits", "what one request or connection may cost (docs/serving.md, "
                               "\"Limits and security\")")
    lim.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes,
                     help="largest request body; more -> 413 before the body is read")
    lim.add_argument("--max-prompt-chars", type=_positive, default=d.max_prompt_chars,
                     help="longest prompt in characters, checked before tokenizing (400); None: the context "
                          "length x the vocabulary's longest token")
    lim.add_argument("--max-stop-strings", type=_positive, default=d.max_stop_strings,
                     help="`stop` entries per request; more -> 400")
    lim.add_argument("--max-stop-chars", type=_positive, default=d.max_stop_chars,
                     help="characters per stop string; longer -> 400")
    lim.add_argument("--tokenizer-workers", type=_positive, default=d.tokenizer_workers,
                     help="threads rendering and tokenizing prompts off the event loop")
    lim.add_argument("--header-timeout", type=_seconds, default=d.header_timeout,
                     help="seconds a client gets to send a request's line and headers; then the connection is "
                          "closed (slowloris guard)")
    lim.add_argument("--max-header-bytes", type=_positive, default=d.max_header_bytes,
                     help="largest request line + headers; more -> connection closed")
    lim.add_argument("--keep-alive-timeout", type=_seconds, default=d.keep_alive_timeout,
                     help="seconds an idle keep-alive connection stays open")
    lim.add_argument("--max-connections", type=_positive, default=d.max_connections,
                     help="open connections (and running requests); more -> 503")
    lim.add_argument("--allowed-hosts", type=_hosts, default=None, metavar="HOST[,HOST...]",
                     help="Host/Origin names accepted besides localhost, 127.0.0.1 and ::1 (DNS-rebinding guard; "
                          "others -> 403); '*' accepts any. None: only those when --host is a loopback address, any "
                          "host otherwise")


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    from .guards import effective_allowed_hosts

    return ServeLimits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                       max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                       tokenizer_workers=args.tokenizer_workers, header_timeout=args.header_timeout,
                       max_header_bytes=args.max_header_bytes, keep_alive_timeout=args.keep_alive_timeout,
                       max_connections=args.max_connections,
                       allowed_hosts=effective_allowed_hosts(args.host, args.allowed_hosts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind serve", description="OpenAI-compatible API server (default "
                                "127.0.0.1:8000): /v1/chat/completions, /v1/completions, /v1/models, /chat, ...",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ModelSpec.add_arguments(p, title="model (same flags as `minimind chat` and the original eval_llm.py)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server to the network)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("MINIMIND_API_KEY"),
                     help="require `Authorization: Bearer KEY` (env MINIMIND_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="model id clients send (default: the weight name)")
    srv.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                     help="serve a LoRA adapter as its own model id NAME (repeatable)")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting beyond the running ones; more get 429")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get at shutdown")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_limit_arguments(p)
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together (KV slots)")
    eng.add_argument("--max-model-len", type=int, default=None, help="context per sequence (default: 2048 or the "
                     "model's own limit)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=SERVE_BATCHED_TOKENS,
                     help="tokens per step (prompt chunking; smaller steps let a burst of requests start sooner)")
    eng.add_argument("--quantization", default=None, choices=("int8", "int4", "dynamic"),
                     help="int8: int8 weights (per channel) x int8 activations (per 32 values, llama.cpp's Q8_0 "
                          "scheme); int4: 4-bit weight blocks (llama.cpp's Q4_K, else Q4_0) made at load; dynamic: "
                          "torch.ao quantize_dynamic (the seeds' path)")
    eng.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "float16"),
                     help="KV cache storage; float16 halves its memory and what attention reads (values rounded to "
                          "fp16, attention still computes in fp32); auto: fp32 on CPU")
    eng.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    eng.add_argument("--engine-loop", default="auto", choices=("auto", "thread", "inline"),
                     help="where engine steps run: thread (the engine's own thread; the event loop only renders and "
                          "sends) or inline on the event loop's thread (slower: steps and HTTP share one thread); "
                          "auto: thread")
    eng.add_argument("--stream-interval", type=_positive, default=1, metavar="N",
                     help="tokens per streamed chunk: 1 (default) sends every token; N > 1 sends a stream's first "
                          "token at once, then a chunk per N tokens (less HTTP work per token on a small CPU)")
    eng.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV of shared prompt prefixes")
    return p


def parse_lora(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {spec!r}")
        out[name] = path
    return out


def load_engines(args: argparse.Namespace) -> dict:
    """{model id: LLM}: the base model (with --lora_weight merged) carrying every --lora adapter."""
    from ..checkpoint.lora import merge_lora
    from ..engine import LLM

    spec = ModelSpec.from_args(args)
    source = spec.resolve()
    model, tokenizer = spec.load("cpu", source)
    merge_lora(model)  # --lora_weight is part of the base model
    adapters = {name: spec.lora_path(model.config.hidden_size, path) for name, path in parse_lora(args.lora).items()}
    kwargs = {"tokenizer": tokenizer, "dtype": spec.dtype_or_none,
              "quantization": args.quantization, "max_model_len": args.max_model_len,
              "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "enable_prefix_caching": not args.no_prefix_caching, "threads": args.threads,
              "kv_dtype": None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
              "stream_interval": args.stream_interval}
    name = args.served_model_name or source.weight or "minimind"
    if name in adapters:
        raise ValueError(f"--lora name {name!r} is the base model's id; pick another name")
    return {name: LLM(model, lora_adapters=adapters, **kwargs)}


def build_app(args: argparse.Namespace):
    """The model is loaded on the thread that will run its steps (engine_client.py): an EngineThread, or for
    --engine-loop inline the calling thread, which must then run the event loop (main() does)."""
    from .engine_client import AsyncEngine, EngineThread
    from .openai_server import create_app

    inline = args.engine_loop == "inline"
    thread = None if inline else EngineThread()
    llms = load_engines(args) if inline else thread.call(load_engines, args)
    engines = {name: AsyncEngine(llm, max_queue=args.max_queue, thread=thread, inline=inline)
               for name, llm in llms.items()}
    return create_app(engines, api_key=args.api_key, max_queue=args.max_queue, drain_timeout=args.drain_timeout,
                      limits=limits_from_args(args))


def freeze_startup_heap() -> int:
    """Moves every object the startup made (torch, the model, FastAPI, ...) out of the garbage collector's reach, as
    vLLM's server does: a full collection would walk them all every few thousand requests with the GIL held."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.api_key == "":  # checked before the model loads; an empty key would turn auth off without a word
        print("error: --api-key (or MINIMIND_API_KEY) is empty; give a key, or unset both to serve without one",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        app = build_app(args)
    except CheckpointError:
        raise  # an unusable model/tokenizer file: cli.py reports it as for every command (exit 2)
    except Exception as exc:  # one clear line, as `minimind chat` does (MINIMIND_DEBUG=1 shows the traceback)
        if os.environ.get("MINIMIND_DEBUG"):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    import uvicorn

    from .connections import guarded_protocol
    from .guards import is_loopback

    if not is_loopback(args.host) and not args.api_key:
        logging.getLogger("minimind.serve").warning("listening on %s without --api-key", args.host)
    served = ", ".join(app.state.ctx.engines)
    print(f"serving {served} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    freeze_startup_heap()
    limits = limits_from_args(args)
    # header timeout and size: HeadWatch on uvicorn's own protocol class; ws="none": no route takes a websocket
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout + 5, ws="none",
                http=guarded_protocol(limits.header_timeout, limits.max_header_bytes),
                h11_max_incomplete_event_size=limits.max_header_bytes, timeout_keep_alive=limits.keep_alive_timeout,
                limit_concurrency=limits.max_connections)
    return 0
