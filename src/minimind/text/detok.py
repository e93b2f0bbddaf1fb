"""Streaming detokenization that never emits half a character.

Byte-level BPE splits one Chinese character or emoji across several tokens; decoding a prefix that ends inside
such a character yields U+FFFD. We keep two offsets into the ids (the technique of HF TGI / vLLM):
`prefix` .. `read` is text already emitted (re-decoded only as left context, because some tokenizers decode a
token differently at the start of a sequence), `read` .. end is pending. New text is emitted only when the pending
window decodes to something that does not end in U+FFFD. Each push decodes a few recent tokens, never the
whole sequence, and ids before `prefix` are dropped.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


def _backend_decode(tokenizer):
    """The `tokenizers.Tokenizer.decode` behind a transformers fast tokenizer whose decode adds nothing to it (no
    subclass override; the space clean-up is off here anyway), else None. The wrapper's argument conversion costs
    ~4x the decode itself, twice per streamed token on the engine thread."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    if isinstance(tokenizer, PreTrainedTokenizerFast) and cls.decode is PreTrainedTokenizerFast.decode \
            and cls._decode is PreTrainedTokenizerFast._decode:
        return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)
    return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = _backend_decode(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # start of the left-context window (already emitted)
        self._read = 0  # everything before this index has been emitted

    def _decode(self, ids: list[int]) -> str:
        # No space clean-up: it rewrites text around punctuation differently for a window and a whole sequence.
        if self._backend is not None:
            return self._backend(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character comes out as U+FFFD, like a full decode)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if not final and (full.endswith(_REPLACEMENT) or len(full) <= len(done)):
            return ""  # mid-character (or nothing visible yet, e.g. a skipped special token): wait for more
        # `done` ended on a whole character, so `full` extends it; slice rather than trust a shorter decode.
        new = full[len(done):]
        del self._ids[:self._read]  # keep only the pending tokens as the next left context
        self._prefix, self._read = 0, len(self._ids)
        return new
