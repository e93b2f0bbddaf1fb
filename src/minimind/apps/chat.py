"""`minimind chat`: the original `eval_llm.py`, done right.

Same flags as the original (--load_from model --save_dir out --weight full_sft --hidden_size ...), plus --model for
any checkpoint format, presets, --prompt for one non-interactive answer, and separate prefill/decode speeds.

Output: with --prompt, stdout carries only the answer (so `$(minimind chat --prompt ...)` captures just that);
the banner and the speed line go to stderr. Interactively everything goes to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint.generation import SamplingDefaults, sampling_defaults
from ..checkpoint.spec import ModelSpec
from ..errors import CheckpointError

# name -> (temperature, top_p); the three strategies of the seed documents' table.
PRESETS = {"deterministic": (0.1, 0.5), "balanced": (0.7, 0.85), "creative": (1.0, 0.95)}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
MODEL_DEFAULT = "default: the model's own (its generation_config.json or GGUF keys, else its release's defaults)"


def add_open_thinking(group) -> None:
    group.add_argument("--open_thinking", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                       help="reasoning mode: 1 opens a <think> block (minimind-3 open_thinking / 2510 enable_thinking)"
                            "; default: the chat template's own default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ModelSpec.add_arguments(p)
    gen = p.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=8192, help="most tokens per answer")
    gen.add_argument("--temperature", type=float, default=None,
                     help=f"sampling temperature; 0 = greedy ({MODEL_DEFAULT}, or the preset's; the banner shows "
                          "the values in use)")
    gen.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold (default: as --temperature)")
    gen.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens, 0 = off (default: the "
                                                             "model's)")
    gen.add_argument("--min_p", type=float, default=None, help="drop tokens below min_p x the top probability "
                                                               "(default: the model's)")
    gen.add_argument("--repetition_penalty", type=float, default=None,
                     help="HF-style repetition penalty, 1 = off (default: the model's)")
    gen.add_argument("--preset", choices=tuple(PRESETS), default=None,
                     help="temperature/top_p: deterministic 0.1/0.5, balanced 0.7/0.85, creative 1.0/0.95 "
                          "(explicit --temperature/--top_p win)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random seed per answer)")
    add_open_thinking(gen)
    ui = p.add_argument_group("conversation")
    ui.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    ui.add_argument("--historys", type=int, default=0, help="previous turns (question + answer) to keep; 0 = none")
    ui.add_argument("--show_speed", type=int, choices=(0, 1), default=1,
                    help="print prefill and decode tokens/s after each answer")
    ui.add_argument("--mode", type=int, choices=(0, 1), default=None,
                    help="0 = auto test over preset questions, 1 = manual chat (default: ask)")
    ui.add_argument("--prompt", default=None, metavar="TEXT",
                    help="answer this one prompt and exit: the answer on stdout, the speed line on stderr")
    return p


def resolve_sampling(args: argparse.Namespace, defaults: SamplingDefaults) -> dict[str, float]:
    """{temperature, top_p, top_k, min_p, repetition_penalty}: explicit flags beat the preset, the preset beats
    the model's defaults."""
    values = {name: getattr(defaults, name) for name in SAMPLING}
    if args.preset:
        values.update(zip(("temperature", "top_p"), PRESETS[args.preset]))
    return {name: value if getattr(args, name) is None else getattr(args, name) for name, value in values.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # while loading: quit quietly
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line
        return print_error(exc)


def print_error(exc: Exception) -> int:
    """One clear line on stderr, never a traceback (MINIMIND_DEBUG=1 shows it); the exit code 1. A CheckpointError
    goes on to `minimind`'s entry point (cli.py), which reports every command's unusable files alike (exit 2)."""
    if os.environ.get("MINIMIND_DEBUG") or isinstance(exc, CheckpointError):
        raise exc
    message = " ".join(str(exc).split())  # one line, even for torch's multi-paragraph messages
    known = isinstance(exc, (ValueError, OSError))
    print(f"error: {message if known else f'{type(exc).__name__}: {message}'}", file=sys.stderr)
    return 1


# The original eval_llm.py's auto-test questions, and an English set for the (English) default model.
QUESTIONS_ZH = ["你有什么特长？", "为什么天空是蓝色的", "请用Python写一个计算斐波那契数列的函数",
                '解释一下"光合作用"的基本过程', "如果明天下雨，我应该如何出门", "比较一下猫和狗作为宠物的优缺点",
                "解释什么是机器学习", "推荐一些中国的美食"]
QUESTIONS_EN = ["What are you good at?", "Why is the sky blue?",
                "Write a Python function that computes Fibonacci numbers.",
                "Explain the basic process of photosynthesis.", "If it rains tomorrow, how should I go out?",
                "Compare cats and dogs as pets.", "What is machine learning?", "Recommend some Chinese dishes."]


def run(args: argparse.Namespace) -> int:
    from functools import partial

    import torch
    from rich.console import Console

    from ..engine import LLM, SamplingParams
    from ..text.template import is_pretrain_weight, stop_token_ids
    from .conversation import Conversation, engine_tokens, hf_tokens

    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 console must not crash mid-answer on a Chinese character
        if (stream.encoding or "").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    single = args.prompt is not None
    info = Console(stderr=single, highlight=False)
    spec = ModelSpec.from_args(args)
    source = spec.resolve()
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = spec.load(device, source)
    cfg = model.config
    if spec.num_hidden_layers and spec.num_hidden_layers != cfg.num_hidden_layers:
        info.print(f"warning: --num_hidden_layers {spec.num_hidden_layers} ignored: the weights have "
                   f"{cfg.num_hidden_layers} layers", style="yellow", markup=False)
    from ..checkpoint.default_model import default_model_dir

    defaults = sampling_defaults(source.model or default_model_dir(), cfg)
    sampling = resolve_sampling(args, defaults)
    params = SamplingParams(max_tokens=args.max_new_tokens, seed=args.seed,
                            stop_token_ids=sorted(stop_token_ids(tokenizer, cfg)), **sampling)
    name = "embedded default model (SmolLM2-135M-Instruct)" if source.model is None else str(source.model)
    size = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    kept = sorted({m.gguf_blocks[0] for m in model.modules() if hasattr(m, "gguf_blocks")})
    if kept:  # the engine computes from the GGUF's blocks; the module weights are stand-ins
        from gguf import GGMLQuantizationType

        dtype = f"GGUF {'/'.join(GGMLQuantizationType(t).name for t in kept)} blocks"
    if device == "cpu":  # the engine keeps its own (fused) copies of the weights: the model is dropped
        context = min(cfg.max_position_embeddings, 4096)
        generate = partial(engine_tokens, LLM(model, tokenizer=tokenizer, max_num_seqs=1, max_model_len=context))
    else:
        context, generate = cfg.max_position_embeddings, partial(hf_tokens, model)
    del model
    conversation = Conversation(generate, tokenizer, params, info, context=context, system=args.system,
                                historys=args.historys,
                                open_thinking=None if args.open_thinking is None else bool(args.open_thinking),
                                pretrain=is_pretrain_weight(source.weight), show_speed=bool(args.show_speed))
    info.print(f"[bold cyan]MiniMind chat[/] {name} [dim]| {getattr(cfg, 'era', cfg.model_type)}, {size:.2f}M "
               f"params, {device} {dtype}, {_describe(sampling, defaults)}"
               f"{', pretrain prompt' if conversation.pretrain else ''}[/]")
    if single:
        conversation.answer(args.prompt)
        return 0
    mode = args.mode
    prompt = "[0] 自动测试 auto test\n[1] 手动输入 manual chat\n"
    while mode is None:  # ask again on a typo (e.g. a question typed before choosing) instead of exiting
        try:
            choice = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if choice in ("0", "1"):
            mode = int(choice)
        else:
            prompt = f"please type 0 or 1 (got {choice[:40]!r}): "
    info.print("[dim]Ctrl-C stops an answer; an empty line or Ctrl-D exits.[/]")
    if mode == 0:
        english = source.model is None or len(tokenizer) != 6400
        for question in QUESTIONS_EN if english else QUESTIONS_ZH:
            print(f"💬: {question}\n🤖: ", end="", flush=True)
            conversation.answer(question)
            print()
        return 0
    while True:
        try:
            question = input("💬: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question.strip():
            return 0
        print("🤖: ", end="", flush=True)
        conversation.answer(question)
        print()


def _describe(sampling: dict, defaults: SamplingDefaults) -> str:
    """'temperature 0.2, top_p 0.9 (SmolLM2-135M-Instruct's model card)', the source only if nothing overrides it."""
    used = SamplingDefaults(**sampling, source=defaults.source)
    return used.describe() if used == defaults else used.describe().rsplit(" (", 1)[0]
