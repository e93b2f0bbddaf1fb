"""response_format (json_object / json_schema) enforced by constrained decoding with llguidance.

Each constrained sequence gets an LLMatcher through the engine's `SamplingParams.logits_processors` hook (one
GrammarProcessor per sequence: the engine clones it for every one of n): before every sample its allowed-token
bitmask sets every other logit to -inf, so the output is valid JSON (of the schema) by construction, and
end-of-sequence is only allowed once the value is complete. Rows without a grammar are untouched.
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

    @classmethod
    def create(cls) -> GuidedDecoding | None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            return None
        return cls(llguidance)

    def attach(self, engine, params, response_format) -> None:
        """Validate the grammar now (a bad schema is a 400) and add its processor to `params`."""
        tok = self._tokenizers.get(id(engine.tokenizer))
        if tok is None:
            tok = self._tokenizers[id(engine.tokenizer)] = self.ll.hf.from_tokenizer(engine.tokenizer)
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
            grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise APIError(400, f"invalid JSON schema: {exc}", param="response_format") from None
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise APIError(400, f"response_format cannot be enforced: {messages[0]}", param="response_format")
        params.logits_processors = [*(params.logits_processors or []), GrammarProcessor(self.ll, tok, grammar)]


class GrammarProcessor:
    """Masks the logits of one sequence to the tokens its grammar allows next; `clone()` gives a fresh matcher."""

    def __init__(self, ll, tokenizer, grammar: str):
        self.ll, self.tokenizer, self.grammar = ll, tokenizer, grammar
        self.matcher = None  # built at the first call, on the engine thread
        self.consumed = 0

    def clone(self) -> GrammarProcessor:
        return GrammarProcessor(self.ll, self.tokenizer, self.grammar)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.matcher is None:
            self.matcher = self.ll.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        new = token_ids[self.consumed:]
        if new:
            self.matcher.consume_tokens(new)
            self.consumed += len(new)
        if self.matcher.is_error():  # unconstrained from here on rather than a failed request
            log.warning("constrained decoding gave up: %s", self.matcher.get_error())
            return logits
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> _BITS) & 1).bool().flatten()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(logits.shape[-1], bits.numel())
        allowed[:n] = bits[:n]
        return logits.masked_fill(~allowed, float("-inf"))
