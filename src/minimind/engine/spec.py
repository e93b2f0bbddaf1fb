"""Speculative decoding with a small draft model that shares the tokenizer (e.g. MiniMind2-Small for MiniMind2).

Per step the draft proposes k tokens one by one; the target scores all of them in one chunk forward and keeps
the longest prefix it agrees with plus its own next token, so greedy output is exactly plain greedy. Steps
with sampling, penalties, logprobs, several sequences or prompt chunks run the plain path, which keeps
their output distribution unchanged trivially.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache, common_prefix_len
from .model_runner import ModelRunner
from .scheduler import Batch, Chunk


class Speculator:
    def __init__(self, llm, draft_model, num_tokens: int = 4):
        if not isinstance(draft_model, torch.nn.Module):
            from ..checkpoint.loader import load_model

            draft_model = load_model(draft_model, dtype="float32" if llm.quantization else llm.dtype, light=True)
        cfg = draft_model.config
        if cfg.vocab_size != llm.config.vocab_size:
            raise ValueError(f"draft vocabulary {cfg.vocab_size} != target vocabulary {llm.config.vocab_size}: "
                             "the draft model must share the tokenizer")
        self.llm, self.k = llm, num_tokens
        self.kv = KVCache(cfg.num_hidden_layers, llm.max_num_seqs, cfg.num_key_value_heads, llm.max_model_len,
                          cfg.head_dim, llm.kv_dtype)
        quant = llm.quantization if llm.quantization != "dynamic" else None
        self.runner = ModelRunner(draft_model, self.kv, llm.runner.dtype, quant, weight_dtype=llm.dtype)
        self.slot_tokens: list[list[int]] = [[] for _ in range(llm.max_num_seqs)]  # tokens with valid draft KV
        self.proposed = self.accepted = 0  # acceptance statistics

    def applies(self, batch: Batch) -> bool:
        if batch.prefill or len(batch.decode) != 1:
            return False
        p = batch.decode[0].params
        return p.is_plain_greedy and not p.logits_processors

    @torch.no_grad()
    def step(self, batch: Batch):
        seq = batch.decode[0]
        tokens = seq.token_ids  # the target holds KV for all but the last one
        n = len(tokens)
        k = min(self.k, self.llm.max_model_len - n)
        if seq.params.max_tokens is not None:
            k = min(k, seq.params.max_tokens - len(seq.output_token_ids))
        if k < 1:
            return self.llm._run(batch)
        # Draft: catch up on tokens it has not seen in this slot, then propose k tokens greedily.
        have = min(common_prefix_len(self.slot_tokens[seq.slot], tokens), n - 1)
        logits = _forward(self.runner, Chunk(seq, have, n - have, tokens[have:], logits="last"))
        draft = [int(logits[-1].argmax())]
        for i in range(k - 1):
            logits = _forward(self.runner, Chunk(seq, n + i, 1, [draft[-1]], logits="last"))
            draft.append(int(logits[-1].argmax()))
        # Target: score the last real token and every draft token in one chunk.
        verify = Chunk(seq, n - 1, k + 1, [tokens[-1]] + draft, logits="all")
        target = _forward(self.llm.runner, verify).argmax(dim=-1).tolist()  # [k + 1]
        accepted = 0
        while accepted < k and draft[accepted] == target[accepted]:
            accepted += 1
        self.proposed, self.accepted = self.proposed + k, self.accepted + accepted
        seq.num_computed += accepted + 1  # the last token and the accepted drafts now have target KV
        self.slot_tokens[seq.slot] = tokens + draft[:min(accepted, k - 1)]
        return [(seq, [(t, None) for t in draft[:accepted] + [target[accepted]]])]


def _forward(runner: ModelRunner, chunk: Chunk) -> torch.Tensor:
    inputs, _ = runner.prepare(Batch(prefill=[chunk]))
    return runner.forward(inputs)
