"""Damaged and hostile model files: `minimind chat`, `convert` and `serve` each print one short error naming the file
and exit 2, never a traceback, never leave a half-written output, never run a pickle's code.

The files are mutations of real checkpoints of a tiny model (vocab 6400, so the real tokenizers fit): truncated,
bytes flipped, tensors reshaped / swapped / dropped / added, config.json broken, crafted pickles whose payload would
create a marker file. A broad random sample runs in-process (hypothesis); a fixed sample runs each command as a
subprocess.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model, tokenizer_dir
from minimind.cli import main as cli_main
from minimind.errors import CheckpointError

LAYER1_UP = "model.layers.1.mlp.up_proj.weight"
Q0, K0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"


class Evil:
    """Unpickling it runs `os.system(command)`: a crafted checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """good.pth (the original's fp16 state_dict, lm_head and embedding both saved) and hf/ (a `model_type:
    minimind` folder: config.json written here by hand, model.safetensors), both of one tiny model."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("originals")
    sd = {k: v.half().contiguous() for k, v in tiny_model("minimind2", vocab_size=6400).state_dict().items()}
    torch.save(sd, root / "good.pth")
    (root / "hf").mkdir()
    config = {"model_type": "minimind", "vocab_size": 6400, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": sd[LAYER1_UP].shape[0]}
    (root / "hf" / "config.json").write_text(json.dumps(config))
    save_file({k: v.clone() for k, v in sd.items() if k != "lm_head.weight"}, str(root / "hf" / "model.safetensors"))
    return root, sd, config


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_dir("minimind2")


# ------------------------------------------------------------------------------------------------ mutations
# Each writes one bad checkpoint into `work` and returns (the path to pass, whether it is certainly unusable):
# flipped bytes may land in tensor data and leave a loadable file.

def _copy_hf(originals, work: Path) -> Path:
    dst = work / "broken_hf"
    shutil.copytree(originals[0] / "hf", dst)
    return dst


def truncate(originals, work: Path, rng: random.Random):
    src = rng.choice([originals[0] / "good.pth", originals[0] / "hf" / "model.safetensors"])
    data = src.read_bytes()
    dst = work / f"cut{src.suffix}"
    dst.write_bytes(data[:rng.randrange(len(data))])  # a zip loses its central directory, safetensors its data
    return dst, True


def flip(originals, work: Path, rng: random.Random):
    src = rng.choice([originals[0] / "good.pth", originals[0] / "hf" / "model.safetensors"])
    data = bytearray(src.read_bytes())
    for _ in range(rng.randint(1, 8)):  # headers and the pickle sit in the first and last few KB
        pos = rng.choice([rng.randrange(2048), len(data) - 1 - rng.randrange(2048), rng.randrange(len(data))])
        data[pos] ^= rng.randrange(1, 256)
    dst = work / f"flip{src.suffix}"
    dst.write_bytes(bytes(data))
    return dst, False


def _random_shape(rng: random.Random, old: tuple[int, ...]) -> tuple[int, ...]:
    while True:
        shape = tuple(rng.choice([1, 3, 5, 7, 8, 16, 64, 192, 6400]) for _ in range(rng.choice([0, 1, 2, 2, 3])))
        if shape != old:
            return shape


def _save_tensors(originals, work: Path, rng: random.Random, sd: dict, name: str):
    """As an original-layout .pth, or as the weights of an HF folder whose config.json is intact."""
    if rng.random() < 0.5:
        torch.save(sd, work / f"{name}.pth")
        return work / f"{name}.pth", True
    from safetensors.torch import save_file

    folder = _copy_hf(originals, work)
    save_file({k: v.contiguous().clone() for k, v in sd.items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    return folder, True


def reshape(originals, work: Path, rng: random.Random):
    """One tensor of another shape: the other layer still has the right ones, so this is never a valid model."""
    sd = dict(originals[1])
    key = rng.choice(sorted(k for k in sd if k != "lm_head.weight"))
    sd[key] = torch.zeros(_random_shape(rng, tuple(sd[key].shape)), dtype=torch.float16)
    return _save_tensors(originals, work, rng, sd, "reshaped")


def retype(originals, work: Path, rng: random.Random):
    sd = dict(originals[1])
    key = rng.choice(sorted(k for k in sd if k != "lm_head.weight"))
    sd[key] = sd[key].to(rng.choice([torch.int8, torch.int32, torch.int64, torch.bool]))
    return _save_tensors(originals, work, rng, sd, "retyped")


def swap(originals, work: Path, rng: random.Random):
    sd = dict(originals[1])
    keys = sorted(k for k in sd if k != "lm_head.weight")
    while True:
        a, b = rng.sample(keys, 2)
        if sd[a].shape != sd[b].shape:
            break
    sd[a], sd[b] = sd[b], sd[a]
    return _save_tensors(originals, work, rng, sd, "swapped")


def drop_or_add(originals, work: Path, rng: random.Random):
    sd = dict(originals[1])
    if rng.random() < 0.5:  # lm_head is optional (tied): every other tensor is required
        del sd[rng.choice(sorted(k for k in sd if k != "lm_head.weight"))]
    else:
        sd[f"model.layers.{rng.randrange(3)}.extra_{rng.randrange(99)}.weight"] = torch.zeros(3, dtype=torch.float16)
    return _save_tensors(originals, work, rng, sd, "keys")


CONFIG_BREAKS = [
    b"", b"{", b"[1, 2, 3]", b'"minimind"', b"42", b"null", b"\xff\xfe\x00garbage", b"{}",
    {"model_type": "gpt2"}, {"model_type": [1]}, {"model_type": None}, {"hidden_size": "abc"}, {"hidden_size": 65},
    {"num_attention_heads": 0}, {"num_key_value_heads": 3}, {"num_key_value_heads": 0}, {"num_hidden_layers": 3},
    {"vocab_size": -1}, {"intermediate_size": 100}, {"rope_scaling": "fast"}, {"family": "minimind9"},
    {"no_such_field": 1}, {"head_dim": 7}, {"hidden_act": "tanh"}, {"quantization_config": [1]},
]


def break_config(originals, work: Path, rng: random.Random):
    folder = _copy_hf(originals, work)
    change = rng.choice(CONFIG_BREAKS)
    if isinstance(change, bytes):
        (folder / "config.json").write_bytes(change)
    else:
        (folder / "config.json").write_text(json.dumps({**originals[2], **change}))
    return folder, True


def crafted_pickle(originals, work: Path, rng: random.Random):
    """A state_dict with a payload that would create `work/PWNED`, as a raw pickle or a torch.save zip."""
    evil = Evil(f"touch {work / 'PWNED'}")
    payload = rng.choice([{"model.embed_tokens.weight": evil}, {**originals[1], "x": evil}, evil, [evil]])
    dst = work / "evil.pth"
    if rng.random() < 0.5:
        dst.write_bytes(pickle.dumps(payload, protocol=rng.choice([2, 3, 4, 5])))
    else:
        torch.save(payload, dst)
    return dst, True


MUTATIONS = [truncate, flip, reshape, retype, swap, drop_or_add, break_config, crafted_pickle]


# ------------------------------------------------------------------------------------------------ checks

def check_error(code: int, err: str, path: Path, certain: bool) -> None:
    """Exit 2 with one short message naming the file, or (a flip that left the file usable) exit 0."""
    assert code in ((2,) if certain else (0, 2)), err
    assert "Traceback" not in err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert 1 <= len(lines) <= 3 and len(err) < 1200, err
        assert path.name in err, err
        assert "weights_only=False" not in err.replace(" ", ""), err


def run_in_process(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, err.getvalue()


def test_the_originals_load(originals, tokenizer, tmp_path):
    """The mutations start from files that work: every failure below is the mutation's."""
    root = originals[0]
    for src in (root / "good.pth", root / "hf"):
        code, err = run_in_process(["chat", "--model", str(src), "--tokenizer", str(tokenizer), "--prompt", "hi",
                                    "--max_new_tokens", "2", "--temperature", "0", "--show_speed", "0"])
        assert code == 0, err
        assert run_in_process(["convert", str(src), str(tmp_path / f"{src.stem}.pth"), "--to", "native"])[0] == 0


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=st.sampled_from(MUTATIONS), rng=st.randoms(use_true_random=False))
def test_any_bad_file_is_one_short_error(originals, tokenizer, tmp_path_factory, mutation, rng):
    """In-process, through cli.main: chat, convert (nothing left in the output folder) and serve's loading path."""
    from minimind.checkpoint.spec import ModelSpec

    work = tmp_path_factory.mktemp("mutant")
    path, certain = mutation(originals, work, rng)
    out = work / "out"
    out.mkdir()
    code, err = run_in_process(["convert", str(path), str(out / "m.pth"), "--to", "native"])
    check_error(code, err, path, certain)
    assert sorted(p.name for p in out.iterdir()) == (["m.pth"] if code == 0 else [])  # hidden temp files too
    code, err = run_in_process(["chat", "--model", str(path), "--tokenizer", str(tokenizer), "--prompt", "hi",
                                "--max_new_tokens", "1", "--show_speed", "0"])
    check_error(code, err, path, certain)
    if code == 2:  # serve loads through ModelSpec.load as chat does: the same error
        with pytest.raises(CheckpointError, match=path.name):
            ModelSpec(model=str(path), tokenizer=str(tokenizer)).load("cpu")
    assert not (work / "PWNED").exists()


def test_damaged_gguf(originals, tokenizer, tmp_path):
    """GGUF files cut short or with flipped bytes (fewer: reading one's metadata takes most of a second)."""
    from minimind.convert import export_gguf

    data = export_gguf(originals[0] / "good.pth", tmp_path / "good.gguf", "f16", tokenizer=tokenizer,
                       show_progress=False).read_bytes()
    rng = random.Random(0)
    for i in range(4):
        bad = bytearray(data)
        if i % 2:
            for _ in range(rng.randint(1, 4)):
                bad[rng.randrange(len(bad))] ^= rng.randrange(1, 256)
        else:  # the last bytes may be alignment padding
            bad = bad[:rng.randrange(len(bad) - 64)]
        path = tmp_path / f"bad{i}.gguf"
        path.write_bytes(bytes(bad))
        (tmp_path / f"out{i}").mkdir()
        code, err = run_in_process(["convert", str(path), str(tmp_path / f"out{i}" / "m.pth"), "--to", "native"])
        check_error(code, err, path, certain=i % 2 == 0)
        assert [p.name for p in (tmp_path / f"out{i}").iterdir()] == (["m.pth"] if code == 0 else [])


# ------------------------------------------------------------------------------------------------ subprocesses

@pytest.fixture(scope="module")
def fixed_sample(originals, tmp_path_factory):
    """One certainly-bad file per kind of damage (the issue's cases among them)."""
    work = tmp_path_factory.mktemp("fixed")
    sd, files = originals[1], {}

    def save(name: str, **changes):
        torch.save({**sd, **changes}, work / name)
        files[name] = work / name

    good = (originals[0] / "good.pth").read_bytes()
    (work / "trunc.pth").write_bytes(good[: len(good) // 2])
    files["trunc.pth"] = work / "trunc.pth"
    save("shape.pth", **{LAYER1_UP: torch.zeros(3, 3)})
    save("q75.pth", **{Q0: torch.zeros(7, 5)})
    save("k5.pth", **{K0: torch.zeros(5, 64)})
    (work / "evil.pth").write_bytes(pickle.dumps({"x": Evil(f"touch {work / 'PWNED'}")}, protocol=2))
    files["evil.pth"] = work / "evil.pth"
    torch.save({"x": Evil(f"touch {work / 'PWNED'}")}, work / "evil_zip.pth")
    files["evil_zip.pth"] = work / "evil_zip.pth"
    shutil.copytree(originals[0] / "hf", work / "hfbad")
    (work / "hfbad" / "config.json").write_text("[1, 2, 3]")
    files["hfbad"] = work / "hfbad"
    (work / "junk.gguf").write_bytes(b"GGUF" + random.Random(0).randbytes(100))
    files["junk.gguf"] = work / "junk.gguf"
    return work, files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_DEBUG"}
    return subprocess.run([sys.executable, "-m", "minimind", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_all(commands: list[tuple[Path, list[str]]], cwd: Path) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Two at a time (each start costs seconds on a small machine)."""
    with ThreadPoolExecutor(2) as pool:
        return list(zip([p for p, _ in commands], pool.map(lambda c: run_cli(c[1], cwd), commands)))


def test_chat_subprocess(fixed_sample, tokenizer):
    work, files = fixed_sample
    commands = [(files[n], ["chat", "--model", str(files[n]), "--tokenizer", str(tokenizer), "--prompt", "hi"])
                for n in ("trunc.pth", "evil.pth")]
    # without --tokenizer: the file's problem, not a request for a tokenizer
    commands += [(files[n], ["chat", "--model", str(files[n]), "--prompt", "hi"]) for n in ("shape.pth", "hfbad")]
    for path, res in run_all(commands, work):
        check_error(res.returncode, res.stderr, path, certain=True)
        assert "--tokenizer" not in res.stderr and res.stdout == ""
    assert not (work / "PWNED").exists()


def test_convert_subprocess(fixed_sample, tokenizer):
    work, files = fixed_sample
    cases = [("shape.pth", "native"), ("q75.pth", "hf"), ("evil_zip.pth", "gguf")]
    commands = []
    for name, to in cases:
        (work / f"out-{name}").mkdir()
        dst = work / f"out-{name}" / ("model" if to == "hf" else f"model.{'gguf' if to == 'gguf' else 'pth'}")
        commands.append((files[name], ["convert", str(files[name]), str(dst), "--to", to, "--tokenizer",
                                       str(tokenizer), "--no-progress"]))
    for (path, res), (name, _) in zip(run_all(commands, work), cases):
        check_error(res.returncode, res.stderr, path, certain=True)
        assert list((work / f"out-{name}").iterdir()) == [], name  # nothing written, no hidden temp file
    assert not (work / "PWNED").exists()


def test_serve_subprocess(fixed_sample, tokenizer):
    """Exits 2 before binding: the port stays free."""
    work, files = fixed_sample
    port = _free_port()
    commands = [(files[n], ["serve", "--model", str(files[n]), "--tokenizer", str(tokenizer), "--host", "127.0.0.1",
                            "--port", str(port)]) for n in ("k5.pth", "evil.pth", "hfbad")]
    for path, res in run_all(commands, work):
        check_error(res.returncode, res.stderr, path, certain=True)
        assert "serving" not in res.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert not (work / "PWNED").exists()


def test_web_subprocess(fixed_sample, tokenizer):
    """Both UIs: the file is checked before a server starts (Streamlit would load it only in its own process and
    show the error in the browser)."""
    work, files = fixed_sample
    port = _free_port()
    commands = [(files[n], ["web", "--ui", ui, "--model", str(files[n]), "--tokenizer", str(tokenizer), "--port",
                            str(port)]) for n, ui in (("q75.pth", "streamlit"), ("evil.pth", "streamlit"),
                                                      ("hfbad", "gradio"))]
    for path, res in run_all(commands, work):
        check_error(res.returncode, res.stderr, path, certain=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert not (work / "PWNED").exists()
