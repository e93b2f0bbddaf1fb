"""`minimind convert SRC DST --to {hf,gguf,native,ollama}` and `minimind quantize SRC DST`."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  minimind convert out/full_sft_768.pth minimind-3-hf --to hf --tokenizer model/
  minimind convert jingyaogong/MiniMind2 MiniMind2-f16.gguf --to gguf --outtype f16
  minimind convert minimind-3 ollama-minimind-3 --to ollama --name minimind-3
  minimind convert MiniMind2 full_sft_768.pth --to native
  minimind quantize minimind-3 minimind-3-int8
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: native .pth, HF folder, GGUF, or `default` (the embedded model)")
    p.add_argument("dst", help="output file (gguf, native) or folder (hf, ollama, quantize)")
    p.add_argument("--tokenizer", help="tokenizer folder (needed for a native .pth source; hf/gguf/ollama output)")
    p.add_argument("--lora", help="original LoRA .pth to merge into the weights first")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind convert", description="Export a checkpoint for other tools.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--to", required=True, choices=("hf", "gguf", "native", "ollama"), help="output format")
    p.add_argument("--outtype", default=None, help="GGUF tensor type: f32, f16 (default), bf16, q8_0")
    p.add_argument("--dtype", default="auto",
                   help="hf/native: auto (source dtype; native: float16), float32, float16, bfloat16, int8 (hf)")
    p.add_argument("--arch", default=None, help="hf: force llama, qwen3, qwen3_moe, qwen2_moe or minimind")
    p.add_argument("--name", default=None, help="ollama: model name for `ollama create`")
    return p


def _fail(message: str) -> int:
    print(f"minimind convert: error: {message}", file=sys.stderr)
    return 2


def run_convert(argv: list[str] | None = None) -> int:
    from ..errors import CheckpointError
    from . import export_gguf, export_hf, export_native, export_ollama
    from .source import ConvertError

    args = build_parser().parse_args(argv)
    if args.outtype and args.to not in ("gguf", "ollama"):
        return _fail(f"--outtype is for --to gguf/ollama; for --to {args.to} use --dtype")
    if args.dtype == "int8" and args.to != "hf":
        return _fail("--dtype int8 writes an int8 folder: use it with --to hf (or `minimind quantize`)")
    if args.src == "default":
        args.src = None
    common = {"lora": args.lora, "force": args.force}
    show = not args.no_progress
    try:
        if args.to == "hf":
            out = export_hf(args.src, args.dst, dtype=args.dtype, arch=args.arch, tokenizer=args.tokenizer,
                            show_progress=show, **common)
        elif args.to == "gguf":
            out = export_gguf(args.src, args.dst, args.outtype or "f16", tokenizer=args.tokenizer,
                              show_progress=show, **common)
        elif args.to == "ollama":
            out = export_ollama(args.src, args.dst, outtype=args.outtype or "f16", name=args.name,
                                tokenizer=args.tokenizer, show_progress=show, **common)
        else:
            out = export_native(args.src, args.dst, dtype=args.dtype, **common)
    except (ConvertError, CheckpointError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}")
    if args.to == "ollama":
        print((out / "README.txt").read_text())
    return 0


def run_quantize(argv: list[str] | None = None) -> int:
    from ..errors import CheckpointError
    from . import quantize_int8
    from .source import ConvertError

    p = argparse.ArgumentParser(prog="minimind quantize",
                                description="Write an int8 weight-only checkpoint folder (per-output-channel "
                                            "symmetric int8 + fp32 scales) that `minimind` loads.")
    _common(p)
    args = p.parse_args(argv)
    if args.src == "default":
        args.src = None
    try:
        out = quantize_int8(args.src, args.dst, tokenizer=args.tokenizer, lora=args.lora, force=args.force,
                            show_progress=not args.no_progress)
    except (ConvertError, CheckpointError, FileNotFoundError) as exc:
        print(f"minimind quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
