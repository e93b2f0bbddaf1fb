"""`minimind <command>`: one entry point, each subcommand imported only when it runs (so --help is instant)."""
from __future__ import annotations

import importlib
import os
import sys

from .errors import EXIT_CODE, CheckpointError

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("minimind.apps.chat", "chat in the terminal with any MiniMind checkpoint (default: the embedded model)"),
    "serve": ("minimind.serve.launch", "OpenAI-compatible API server (127.0.0.1:8000 by default)"),
    "web": ("minimind.apps.web", "chat in the browser: Streamlit (default) or Gradio, on 127.0.0.1 (minimind[web])"),
    "bench": ("minimind.apps.bench", "batch-1 prefill/decode speed against transformers and llama.cpp"),
    "convert": ("minimind.convert", "export to transformers/vLLM (hf), llama.cpp (gguf), Ollama, or the original .pth"),
    "quantize": ("minimind.convert.quantize", "write an int8 weight-only checkpoint folder"),
}

USAGE = """usage: minimind <command> [options]

Run MiniMind checkpoints of every release.

commands:
{commands}

`minimind <command> --help` describes each command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items())))
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"minimind {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minimind: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except CheckpointError as exc:  # an unusable model/tokenizer file, from any command: one paragraph, exit 2
        if os.environ.get("MINIMIND_DEBUG"):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
