"""`minimind convert SRC DST --to {hf,gguf,native,ollama,peft}` and `minimind quantize SRC DST`."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..checkpoint.spec import ModelSpec
from ..config import MiniMindConfig
from .gguf_export import QUANTS
from .source import ConvertError, Source, load_source

EPILOG = """examples:
  minimind convert out/full_sft_768.pth minimind-3-hf --to hf --tokenizer model/
  minimind convert jingyaogong/MiniMind2 MiniMind2-f16.gguf --to gguf --outtype f16
  minimind convert minimind-3 ollama-minimind-3 --to ollama --name minimind-3
  minimind convert MiniMind2 full_sft_768.pth --to native
  minimind convert out/lora_identity_768.pth lora-identity --to peft --base minimind-3-hf
  minimind quantize minimind-3 minimind-3-int8
"""


def _parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    p.add_argument("src", help="checkpoint: native .pth, HF folder, GGUF, or `default` (the embedded model)")
    p.add_argument("dst", help="output file (gguf, native) or folder (hf, ollama, quantize)")
    p.add_argument("--tokenizer", help="tokenizer folder (needed for a native .pth source; hf/gguf/ollama output)")
    p.add_argument("--lora", help="original LoRA .pth to merge into the weights first")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _parser("minimind convert", "Export a checkpoint for other tools.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=("hf", "gguf", "native", "ollama", "peft"),
                   help="output format (peft: SRC is a MiniMind LoRA file, written as a PEFT adapter for --base)")
    p.add_argument("--outtype", default=None, help="GGUF tensor type: f32, f16 (default), bf16, q8_0, q4_0, q4_1, "
                   "q4_k_m")
    p.add_argument("--quant", default=None, choices=QUANTS, help="GGUF quantization (the same as --outtype): q8_0, "
                   "q4_0, or q4_k_m (Q4_K with Q6_K where llama.cpp's Q4_K_M puts it)")
    p.add_argument("--dtype", default="auto",
                   help="hf/native/peft: auto (source dtype, float32 with --lora; native: float16; peft: float32), "
                   "float32, float16, bfloat16, int8 (hf)")
    p.add_argument("--arch", default=None, help="hf: force llama, qwen3, qwen3_moe, qwen2_moe or minimind")
    p.add_argument("--name", default=None, help="ollama: model name for `ollama create`")
    p.add_argument("--base", default=None, metavar="PATH", help="peft: the base model the adapter is served with "
                   "(its --to hf folder)")
    ModelSpec.add_arguments(p, only=("inference_rope_scaling",), title="RoPE",
                            helps={"inference_rope_scaling": "hf/gguf/ollama: write the model with YaRN, as `chat "
                                   "--inference_rope_scaling` runs it (x16, standard); 'legacy' = the Oct-Nov 2025 "
                                   "x4 formula (kept only by a model_type minimind folder)"})
    return p


def _fail(prog: str, message: str) -> int:
    print(f"minimind {prog}: error: {message}", file=sys.stderr)
    return 2


def _run(prog: str, export, *args, **kwargs) -> int:
    try:
        out = export(*args, **kwargs)
    except (ConvertError, FileNotFoundError) as exc:  # a CheckpointError goes on to cli.py (exit 2 there too)
        return _fail(prog, str(exc))
    print(f"wrote {out}")
    return 0


def _spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(model=None if args.src == "default" else args.src, tokenizer=args.tokenizer,
                     lora_weight=args.lora)


def _rope_scaled(spec: ModelSpec, scaling: bool | str) -> Source:
    """The source with `inference_rope_scaling` applied to its config, as load_model does for `chat`."""
    source = load_source(spec)
    config = MiniMindConfig(**{**source.config.ctor_kwargs(), "inference_rope_scaling": scaling,
                               "rope_scaling": None})
    return dataclasses.replace(source, config=config)


def main(argv: list[str] | None = None) -> int:
    from . import export_gguf, export_hf, export_native, export_ollama
    from .peft_export import export_peft

    args = build_parser().parse_args(argv)
    if (args.base is None) != (args.to != "peft"):
        return _fail("convert", "--to peft needs --base (the base model's folder)" if args.to == "peft"
                     else "--base is for --to peft")
    if args.to == "peft":
        if args.lora or args.inference_rope_scaling:
            return _fail("convert", "--to peft converts the LoRA file SRC itself: --lora and "
                         "--inference_rope_scaling do not apply")
        return _run("convert", export_peft, args.src, args.dst, base=args.base, dtype=args.dtype, force=args.force)
    if args.quant:
        if args.outtype not in (None, args.quant):
            return _fail("convert", f"--quant {args.quant} and --outtype {args.outtype} disagree: give one")
        args.outtype = args.quant
    if args.outtype and args.to not in ("gguf", "ollama"):
        return _fail("convert", f"--outtype is for --to gguf/ollama; for --to {args.to} use --dtype")
    if args.dtype == "int8" and args.to != "hf":
        return _fail("convert", "--dtype int8 writes an int8 folder: use it with --to hf (or `minimind quantize`)")
    spec, shown = _spec(args), {"force": args.force, "show_progress": not args.no_progress}
    if args.inference_rope_scaling:
        if args.to == "native":
            return _fail("convert", "a .pth holds no config, so no RoPE setting: pass --inference_rope_scaling to "
                         "the original eval_llm.py (or `minimind chat`) instead")
        spec = _rope_scaled(spec, args.inference_rope_scaling)
    if args.to == "native":  # a .pth holds no tokenizer: --tokenizer is not read
        spec = dataclasses.replace(spec, tokenizer=None)
        return _run("convert", export_native, spec, args.dst, dtype=args.dtype, force=args.force)
    if args.to == "hf":
        # lora: says a LoRA is merged (float32 by default) also when spec is already a loaded Source
        return _run("convert", export_hf, spec, args.dst, dtype=args.dtype, arch=args.arch, lora=args.lora, **shown)
    if args.to == "gguf":
        return _run("convert", export_gguf, spec, args.dst, args.outtype or "f16", **shown)
    code = _run("convert", export_ollama, spec, args.dst, outtype=args.outtype or "f16", name=args.name, **shown)
    if code == 0:
        print((Path(args.dst) / "README.txt").read_text())
    return code


def main_quantize(argv: list[str] | None = None) -> int:
    from . import quantize_int8

    args = _parser("minimind quantize", "Write an int8 weight-only checkpoint folder (per-output-channel "
                   "symmetric int8 + fp32 scales) that `minimind` loads.").parse_args(argv)
    return _run("quantize", quantize_int8, _spec(args), args.dst, force=args.force,
                show_progress=not args.no_progress)
