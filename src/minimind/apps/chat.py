"""`minimind chat`: the original `eval_llm.py`, done right.

Same flags as the original (--load_from model --save_dir out --weight full_sft --hidden_size ...), plus --model for
any checkpoint format, presets, --prompt for one non-interactive answer, and separate prefill/decode speeds.

Output: with --prompt, stdout carries only the answer (so `$(minimind chat --prompt ...)` captures just that);
the banner and the speed line go to stderr. Interactively everything goes to stdout.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# name -> (temperature, top_p); the three strategies of the seed documents' table.
PRESETS = {"deterministic": (0.1, 0.5), "balanced": (0.7, 0.85), "creative": (1.0, 0.95)}
DEFAULT_SAMPLING = (0.85, 0.85)  # the original eval_llm.py defaults
SEED_HIDDEN_SIZES = (512, 768, 640)  # tried in this order when --hidden_size is not given


def _rope_arg(value: str):
    v = value.strip().lower()
    if v == "legacy":
        return "legacy"
    if v in ("1", "true", "yes", "on", "yarn"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected nothing, 1/0 or 'legacy', got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model (the original eval_llm.py flags)")
    src.add_argument("--load_from", default=None, metavar="PATH",
                     help="tokenizer folder of the original layout (weights then come from --save_dir/--weight/"
                          "--hidden_size), or a Hugging Face model folder / GGUF file. Default: 'model' if "
                          "--save_dir has .pth files, else the embedded default model")
    src.add_argument("--save_dir", default="out", help="folder of the native .pth weights")
    src.add_argument("--weight", default=None,
                     help="weight name prefix: pretrain, full_sft, dpo, reason, grpo, ... (file "
                          "{save_dir}/{weight}_{hidden_size}[_moe].pth; default full_sft). pretrain* weights get "
                          "bos + text instead of the chat template")
    src.add_argument("--lora_weight", default=None,
                     help="LoRA name (e.g. lora_identity, looked up in every historic location under --save_dir) "
                          "or file; None = no LoRA")
    src.add_argument("--hidden_size", type=int, default=None,
                     help=f"hidden size in the weight file name (default: the first of {SEED_HIDDEN_SIZES} found, then "
                          "any other size in --save_dir)")
    src.add_argument("--num_hidden_layers", type=int, default=None,
                     help="accepted for compatibility: the layer count is read from the weights (warns if different)")
    src.add_argument("--use_moe", type=int, choices=(0, 1), default=0, help="MoE weights (adds _moe to the file name)")
    src.add_argument("--inference_rope_scaling", nargs="?", const=True, default=False, type=_rope_arg,
                     metavar="legacy", help="YaRN RoPE extrapolation (x16, standard); 'legacy' = the Oct-Nov 2025 "
                                            "x4 formula")
    src.add_argument("--model", default=None, metavar="PATH",
                     help="any checkpoint: native .pth, Hugging Face folder (minimind/llama/qwen3) or GGUF")
    src.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (overrides --load_from)")
    src.add_argument("--device", default=None, help="cuda, cpu, mps, cuda:1 ... (default: cuda if available, else cpu)")
    src.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="auto = float32 on CPU, bfloat16 on CUDA (float16 on CPU is replaced by bfloat16)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=8192, help="most tokens per answer")
    gen.add_argument("--temperature", type=float, default=None,
                     help=f"sampling temperature; 0 = greedy (default {DEFAULT_SAMPLING[0]}, or the preset's)")
    gen.add_argument("--top_p", type=float, default=None,
                     help=f"nucleus sampling threshold (default {DEFAULT_SAMPLING[1]}, or the preset's)")
    gen.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="HF-style repetition penalty (1 = off)")
    gen.add_argument("--preset", choices=tuple(PRESETS), default=None,
                     help="temperature/top_p: deterministic 0.1/0.5, balanced 0.7/0.85, creative 1.0/0.95 "
                          "(explicit --temperature/--top_p win)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random seed per answer)")
    gen.add_argument("--open_thinking", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                     help="reasoning mode: 1 opens a <think> block (minimind-3 open_thinking / 2510 enable_thinking)"
                          "; default: the chat template's own default")
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


def resolve_sampling(args: argparse.Namespace) -> tuple[float, float]:
    """(temperature, top_p): explicit flags beat the preset, the preset beats the original defaults."""
    temperature, top_p = PRESETS[args.preset] if args.preset else DEFAULT_SAMPLING
    return (temperature if args.temperature is None else args.temperature,
            top_p if args.top_p is None else args.top_p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..chat.session import run

        return run(args)
    except KeyboardInterrupt:  # while loading: quit quietly
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, never a traceback (MINIMIND_DEBUG=1 shows it)
        if os.environ.get("MINIMIND_DEBUG"):
            raise
        from ..checkpoint.errors import CheckpointError

        known = isinstance(exc, (CheckpointError, ValueError, OSError))
        message = " ".join(str(exc).split())  # one line, even for torch's multi-paragraph messages
        print(f"error: {message if known else f'{type(exc).__name__}: {message}'}", file=sys.stderr)
        return 1


def resolve_source(args: argparse.Namespace) -> dict:
    """Where weights and tokenizer come from: {model, tokenizer, weight} (model None = the embedded default).

    Follows the original's rules, minus its `'model' in path` test: a tokenizer-only folder means the native
    layout (`{save_dir}/{weight}_{hidden}[_moe].pth`); a model folder or GGUF is used as is.
    """
    from ..checkpoint import detect as fmt
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.native import resolve_seed_path

    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if args.model:
        model = Path(args.model).expanduser()
        if not model.exists():
            raise CheckpointError(model, "does not exist (--model takes a .pth/.safetensors/.gguf file or a model "
                                  "folder)")
        if tokenizer is None:
            # a bare .pth has no tokenizer: take the original layout's tokenizer folder if it is there
            fallback = Path(args.load_from or "model")
            bare = model.is_file() and fmt.sniff_file(model) != fmt.GGUF
            tokenizer = fallback if bare and fallback.is_dir() else model
        return {"model": model, "tokenizer": tokenizer, "weight": args.weight or model.stem}
    save_dir = Path(args.save_dir)
    if args.load_from is None and not any(save_dir.glob("*.pth")):
        return {"model": None, "tokenizer": tokenizer, "weight": args.weight or "default"}
    load_from = Path(args.load_from or "model").expanduser()
    if args.load_from is not None or tokenizer is None:
        if not load_from.exists():
            raise CheckpointError(load_from, "does not exist: --load_from takes the original layout's tokenizer "
                                  "folder (`model/`), a Hugging Face model folder or a GGUF file (or pass "
                                  "--tokenizer DIR)")
        if load_from.is_file() or (load_from / "config.json").is_file() or len(list(load_from.glob("*.gguf"))) == 1:
            return {"model": load_from, "tokenizer": tokenizer or load_from, "weight": args.weight or load_from.stem}
    weight = args.weight or "full_sft"
    sizes = [args.hidden_size] if args.hidden_size else _seed_sizes(save_dir, weight, bool(args.use_moe))
    tried = [resolve_seed_path(str(save_dir), weight, h, bool(args.use_moe)) for h in sizes]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise CheckpointError(tried[0], "not found (from --save_dir/--weight/--hidden_size/--use_moe; tried "
                              + ", ".join(map(str, tried)) + "); pass --model PATH for any other file")
    return {"model": found, "tokenizer": tokenizer or load_from, "weight": weight}


def _seed_sizes(save_dir: Path, weight: str, use_moe: bool) -> list[int]:
    """Hidden sizes to try: the released ones first, then any other `{weight}_{N}[_moe].pth` in save_dir."""
    pattern = re.compile(rf"{re.escape(weight)}_(\d+){'_moe' if use_moe else ''}\.pth")
    found = sorted({int(m.group(1)) for f in save_dir.glob(f"{weight}_*.pth") if (m := pattern.fullmatch(f.name))})
    return [*SEED_HIDDEN_SIZES, *(h for h in found if h not in SEED_HIDDEN_SIZES)]
