"""LLM(..., quantization="int4"): every matrix as 4-bit blocks made at load (Q4_K where rows are whole 256-value
super-blocks, Q4_0 elsewhere), run by the GGUF block kernels; checked against the fp32 model's logits."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams
from minimind.engine.quant import BlockLinear

FORCED = [11, 200, 37, 5, 480, 93]
GROWTH = 2 * 7 ** 0.5  # the tokens every model is fed: the same steps on every side


class Recorder:
    """Keeps each step's raw logits and forces the next token from FORCED (teacher forcing)."""

    def __init__(self, rows: list):
        self.rows = rows

    def clone(self):
        return self

    def __call__(self, token_ids, logits):
        self.rows.append(logits.detach().float().clone())
        keep = torch.tensor([FORCED[len(token_ids)]])
        return torch.full_like(logits, float("-inf")).index_fill_(0, keep, 0.0)


def _logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """[len(FORCED), vocab]: the prompt's last row (prefill), then one row per fused decode step."""
    rows: list = []
    params = SamplingParams(temperature=0, max_tokens=len(FORCED), ignore_eos=True, logits_processors=[Recorder(rows)])
    llm.generate([prompt], params)
    return torch.stack(rows)


def _model():
    # hidden 256: attention and gate/up rows are whole Q4_K super-blocks; FFN 320: down_proj's rows are Q4_0 blocks
    return tiny_model("minimind3", False, vocab_size=512, hidden_size=256, num_hidden_layers=2, intermediate_size=320)


def test_int4_logits_near_fp32():
    """Relative (Frobenius) error of the logits over 6 teacher-forced steps (prefill row, then fused decode), bounded
    by GROWTH times the relative error of one product: a logit passes through 7 quantized products (q|k|v, o,
    gate|up, down in each of 2 layers, lm_head) whose errors are independent (sqrt(7)), and the two layers'
    softmax, SiLU and RMS norms can about double what reaches the residual stream (2); GROWTH = 2 sqrt(7) ~ 5.3.
    (1) The kernels against the same 4-bit weights dequantized and run in fp32 (torch path): only the 8-bit
    activations differ, at most ~1 % per product (a 32-value Gaussian block's max is < 4.4 rms: step / sqrt(12)
    = 4.4 / 127 / 3.5 of its rms); measured 3 %. (2) Against the fp32 model: the 4-bit weights' own relative
    error e per matrix (measured here, 7-9 % for these Gaussian weights); measured 3.5 e."""
    model = _model()
    prompt = list(range(3, 40))
    ref = _logits(LLM(copy.deepcopy(model), max_num_seqs=1, max_model_len=64), prompt)
    q4 = LLM(copy.deepcopy(model), max_num_seqs=1, max_model_len=64, quantization="int4")
    assert q4.runner.fused is not None
    lw = q4.runner.layers[0]
    assert isinstance(lw.qkv, BlockLinear) and lw.qkv.ggml_type == 12 and lw.down.ggml_type == 2
    got = _logits(q4, prompt)

    plain = LLM(copy.deepcopy(model), max_num_seqs=1, max_model_len=64, quantization="int4", fused=False)
    for lin in [m for layer in plain.runner.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + \
            [plain.runner.lm_head]:
        lin.packed = False  # F.linear with gguf's dequantization of the blocks, fp32 activations
    exact = _logits(plain, prompt)
    assert float((got - exact).norm() / exact.norm()) <= GROWTH * 0.01

    sd = model.state_dict()
    errors = []
    for name, lin in (("model.layers.0.mlp.down_proj.weight", q4.runner.layers[0].down),
                      ("lm_head.weight", q4.runner.lm_head)):
        w = sd[name] if name in sd else sd["model.embed_tokens.weight"]
        errors.append(float((lin.dequantize() - w).norm() / w.norm()))
    e = max(errors)
    assert 0.02 < e < 0.15, errors  # 4-bit weights: a real but bounded error
    rel = float((got - ref).norm() / ref.norm())
    assert rel <= GROWTH * e, (rel, e)
    assert int((got.argmax(1) == ref.argmax(1)).sum()) >= len(FORCED) // 2


def test_int4_is_a_quarter_of_fp32_weights():
    q4 = LLM(_model(), max_num_seqs=1, max_model_len=32, quantization="int4")
    fp = LLM(_model(), max_num_seqs=1, max_model_len=32)
    matrices = lambda llm: sum(m.nbytes if isinstance(m, BlockLinear) else m.weight.numel() * 4
                               for layer in llm.runner.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert matrices(q4) < 0.16 * matrices(fp)  # Q4_K 4.5 bits, Q4_0 4.5 bits per weight: 0.14 of fp32


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="int8, int4, dynamic"):
        LLM(_model(), max_num_seqs=1, max_model_len=32, quantization="int3")
