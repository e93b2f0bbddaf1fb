"""Sampling defaults come from the model: its generation_config.json, its GGUF general.sampling keys, the default
model's model card, a MiniMind release's eval_llm.py defaults, else llama.cpp's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from minimind.checkpoint.generation import SamplingDefaults, sampling_defaults


def _gguf(path, **sampling):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in sampling.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_int32)(f"general.sampling.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_generation_config_of_a_folder_wins(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}))
    d = sampling_defaults(tmp_path, tiny_config())
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (0.6, 0.9, 20, 0.0, 1.1)
    assert "generation_config.json" in d.describe()


def test_greedy_generation_config_means_temperature_zero(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert sampling_defaults(tmp_path, tiny_config()).temperature == 0.0


def test_gguf_sampling_keys(tmp_path):
    path = _gguf(tmp_path / "m.gguf", temp=0.3, top_k=7)
    d = sampling_defaults(path, tiny_config(vocab_size=1000))
    # the keys present are the file's, the rest llama.cpp's (top_p 0.95, min_p 0.05)
    assert (d.temperature, d.top_k, d.top_p, d.min_p) == (pytest.approx(0.3), 7, 0.95, 0.05)


def test_gguf_without_sampling_keys_falls_back(tmp_path):
    path = _gguf(tmp_path / "m.gguf")
    assert sampling_defaults(path, tiny_config(vocab_size=1000)) == SamplingDefaults()


@pytest.mark.parametrize("family, top_p", [("minimind2", 0.85), ("minimind3", 0.95)])
def test_minimind_weights_get_the_release_defaults(tmp_path, family, top_p):
    """eval_llm.py: temperature 0.85, top_p 0.85 (minimind-3: 0.95); HF generate's top_k 50."""
    pth = tmp_path / "full_sft_512.pth"
    pth.write_bytes(b"")
    d = sampling_defaults(pth, tiny_config(family, vocab_size=6400))
    assert (d.temperature, d.top_p, d.top_k) == (0.85, top_p, 50)


def test_default_model_uses_its_model_card(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    d = sampling_defaults(folder, tiny_config(vocab_size=49152))
    assert (d.temperature, d.top_p) == (0.2, 0.9) and "model card" in d.describe()


def test_unknown_model_gets_llama_cpp_defaults():
    d = sampling_defaults(None, tiny_config(vocab_size=1000))
    assert (d.temperature, d.top_k, d.top_p, d.min_p) == (0.8, 40, 0.95, 0.05)


def test_the_server_fills_left_out_fields_from_the_model(tmp_path):
    """An LLM knows its model's defaults (here a MiniMind2 .pth: the release's); a request that leaves the sampling
    fields out gets them, one that sets them keeps its own."""
    import torch

    from conftest import tiny_model
    from minimind.engine import LLM
    from minimind.serve.context import sampling_params
    from minimind.serve.protocol import ChatCompletionRequest

    pth = tmp_path / "full_sft_64.pth"
    torch.save(tiny_model(vocab_size=6400).state_dict(), pth)
    llm = LLM(str(pth), max_num_seqs=1, max_model_len=32)
    assert (llm.sampling_defaults.temperature, llm.sampling_defaults.top_k) == (0.85, 50)
    left_out = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    p = sampling_params(left_out, max_tokens=8, vocab_size=6400, logprobs=None, defaults=llm.sampling_defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.85, 0.85, 50)
    given = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0, top_k=3)
    p = sampling_params(given, max_tokens=8, vocab_size=6400, logprobs=None, defaults=llm.sampling_defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.85, 3)
