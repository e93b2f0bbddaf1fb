"""response_format (json_object / json_schema) enforced by constrained decoding with llguidance.

Each constrained sequence gets an LLMatcher; before every sample its allowed-token bitmask sets every other
logit to -inf, so the output is valid JSON (of the schema) by construction, and end-of-sequence is only
allowed once the value is complete. The engine has no logits-processor hook yet, so this module wraps the
engine's `runner.sample` once per engine (the requested engine change is a `logits_processors` hook on
SamplingParams applied in ModelRunner.sample; see docs/serving.md). Rows without a grammar are untouched.
"""
from __future__ import annotations

import logging

import torch

from .errors import APIError

log = logging.getLogger("minimind.serve")
_BITS = torch.arange(32, dtype=torch.int32)


class GuidedDecoding:
    def __init__(self, llguidance):
        self.ll = llguidance
        self._tokenizers: dict[int, object] = {}  # id(hf tokenizer) -> LLTokenizer (about 1 s to build: cached)
        self._wrapped: set[int] = set()

    @classmethod
    def create(cls) -> GuidedDecoding | None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            return None
        return cls(llguidance)

    def ll_tokenizer(self, tokenizer):
        key = id(tokenizer)
        if key not in self._tokenizers:
            self._tokenizers[key] = self.ll.hf.from_tokenizer(tokenizer)
        return self._tokenizers[key]

    def grammar_for(self, response_format) -> str:
        if response_format.type == "json_object":
            schema = {"type": "object"}
        else:
            spec = response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                               param="response_format.json_schema")
            schema = spec.schema_
        try:
            # whitespace is free in JSON; a small model then rambles in spaces, so keep the form compact
            return self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise APIError(400, f"invalid JSON schema: {exc}", param="response_format") from None

    def attach(self, engine, params, response_format) -> None:
        """Validate the grammar now (a bad schema is a 400) and mark `params` for the sampler."""
        tok = self.ll_tokenizer(engine.tokenizer)
        grammar = self.grammar_for(response_format)
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise APIError(400, f"response_format cannot be enforced: {messages[0]}", param="response_format")
        params.guided_grammar = grammar  # SamplingParams is a plain dataclass: the wrapped sampler reads this
        params.guided_tokenizer = tok
        self._wrap(engine.llm)

    def _wrap(self, llm) -> None:
        if id(llm) in self._wrapped:
            return
        self._wrapped.add(id(llm))
        original = llm.runner.sample
        ll = self.ll

        def sample(logits: torch.Tensor, seqs: list):
            rows = [i for i, s in enumerate(seqs) if getattr(s.params, "guided_grammar", None)]
            if rows:
                logits = logits.clone()
                for i in rows:
                    mask = _row_mask(ll, seqs[i], logits.shape[-1])
                    if mask is not None:
                        logits[i].masked_fill_(~mask, float("-inf"))
            return original(logits, seqs)

        llm.runner.sample = sample


def _row_mask(ll, seq, vocab: int) -> torch.Tensor | None:
    """Allowed tokens [V] bool for this sequence's next position (None = unconstrained after a matcher error)."""
    state = getattr(seq, "_guided", None)
    if state is None:
        matcher = ll.LLMatcher(seq.params.guided_tokenizer, seq.params.guided_grammar, log_level=0)
        state = seq._guided = {"matcher": matcher, "consumed": 0}
    matcher = state["matcher"]
    new = seq.output_token_ids[state["consumed"]:]
    if new:
        matcher.consume_tokens(new)
        state["consumed"] += len(new)
    if matcher.is_error():
        log.warning("constrained decoding gave up on request %s: %s", seq.request_id, matcher.get_error())
        return None
    words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    bits = ((words[:, None] >> _BITS) & 1).bool().flatten()
    allowed = torch.zeros(vocab, dtype=torch.bool)
    n = min(vocab, bits.numel())
    allowed[:n] = bits[:n]
    return allowed
