"""`minimind web`: Streamlit (default) or Gradio chat in the browser, on 127.0.0.1 unless told otherwise.

In-process engine on any checkpoint (the same model flags as `minimind chat`, plus its --dtype and --open_thinking;
default: the embedded model; pretrain* weights get bos + text as in chat), or `--api-base URL`: a thin client of
`minimind serve` or any OpenAI-compatible server. `--lang` and `--theme` apply to both UIs.
Needs `pip install minimind[web]`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from ..checkpoint.spec import ModelSpec

# the model flags of `minimind chat` that apply to a web UI
SOURCE_FIELDS = ("load_from", "save_dir", "weight", "lora_weight", "hidden_size", "use_moe", "model", "tokenizer",
                 "dtype")


def build_parser() -> argparse.ArgumentParser:
    from ..web.text import TEXT
    from .chat import add_open_thinking

    p = argparse.ArgumentParser(prog="minimind web", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ui", choices=("streamlit", "gradio"), default="streamlit", help="which web UI")
    src = ModelSpec.add_arguments(p, only=SOURCE_FIELDS, title="model (as in `minimind chat`)")
    add_open_thinking(p.add_argument_group("generation (as in `minimind chat`; temperature, top_p, max tokens are "
                                           "sliders)"))
    src.add_argument("--api-base", default=None, metavar="URL",
                     help="use a running OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) instead of a "
                          "local model")
    src.add_argument("--api-key", default=None, help="API key for --api-base (default: $OPENAI_API_KEY)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the UI to your network)")
    net.add_argument("--port", type=int, default=None, help="port (default: 8501 for Streamlit, 7860 for Gradio)")
    net.add_argument("--share", action="store_true", help="Gradio only: a public *.gradio.live link")
    look = p.add_argument_group("look")
    look.add_argument("--lang", choices=tuple(TEXT), default="en",
                      help="UI language, both UIs (Streamlit also has a switch in its sidebar)")
    look.add_argument("--theme", choices=("auto", "dark", "light"), default="auto",
                      help="colour scheme, both UIs; auto follows the browser's setting")
    return p


def backend_config(args: argparse.Namespace):
    from ..web.backend import BackendConfig

    open_thinking = None if args.open_thinking is None else bool(args.open_thinking)
    if args.api_base:
        if args.dtype != "auto":
            raise ValueError("--dtype applies to a local model; the server behind --api-base chose its own")
        return BackendConfig(api_base=args.api_base, api_key=args.api_key, open_thinking=open_thinking)
    from ..text.template import is_pretrain_weight

    spec = ModelSpec.from_args(args)
    src = spec.resolve()
    lora = spec.lora_path()
    as_str = lambda p: None if p is None else str(p)
    return BackendConfig(model=as_str(src.model), tokenizer=as_str(src.tokenizer), lora=as_str(lora),
                         dtype=spec.dtype_or_none, open_thinking=open_thinking,
                         pretrain=is_pretrain_weight(src.weight))  # as `minimind chat`: bos + text, no template


def check_files(config) -> None:
    """The checks `minimind chat` makes before it answers (weights read and checked against their config, the
    tokenizer loaded and matched): a CheckpointError becomes the CLI's one-paragraph error and exit 2."""
    if config.api_base:
        return
    from ..checkpoint.loader import check_tokenizer_matches, load_tokenizer, read_checkpoint

    path = config.model
    if path is not None:
        model_config, _ = read_checkpoint(path)
        check_tokenizer_matches(load_tokenizer(config.tokenizer), model_config, where=str(config.tokenizer))


def streamlit_command(args: argparse.Namespace) -> list[str]:
    app = Path(__file__).resolve().parents[1] / "web" / "streamlit_app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
            "--server.port", str(args.port or 8501), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal",
            # auto: no base theme, so Streamlit follows the browser's light/dark preference
            *(["--theme.base", args.theme] if args.theme != "auto" else [])]


def run_streamlit(command: list[str], env: dict[str, str]) -> NoReturn:
    """Becomes the Streamlit server (exec, same pid): a supervisor's SIGTERM or a terminal's Ctrl-C reaches Streamlit
    itself, which stops and frees its port; no parent is left to exit without it. Everything the server needs
    travels in `env`, so nothing of this process has to outlive it."""
    sys.stdout.flush()  # exec drops what Python still buffers
    sys.stderr.flush()
    os.execve(command[0], command, env)


def main(argv: list[str] | None = None) -> int:
    from ..web.backend import CONFIG_ENV, make_backend
    from ..web.text import LANG_ENV
    from .chat import print_error

    args = build_parser().parse_args(argv)
    if args.share and args.ui != "gradio":
        print("error: --share is a Gradio option (use --ui gradio)", file=sys.stderr)
        return 2
    try:
        config = backend_config(args)
        if args.ui == "streamlit":  # the UI process loads the model: an unusable file is reported here first
            check_files(config)
            run_streamlit(streamlit_command(args), {**os.environ, CONFIG_ENV: config.to_env(), LANG_ENV: args.lang})
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ValueError("the Gradio UI needs `pip install minimind[web]`") from None
        from ..web.gradio_app import launch

        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        backend = make_backend(config)  # an unusable checkpoint or tokenizer: one line, as `minimind chat`
    except (ValueError, OSError) as exc:
        return print_error(exc)
    except KeyboardInterrupt:
        return 130
    try:  # blocks until SIGTERM or Ctrl-C, then closes the server
        launch(backend, host=args.host, port=args.port or 7860, share=args.share, lang=args.lang, theme=args.theme)
    except KeyboardInterrupt:  # Ctrl-C before the server was up, or again while it closes
        return 130
    finally:
        backend.close()  # joins the engine thread: no step runs while the interpreter shuts down
    return 0
