"""Token text, logprob and usage shapes of the OpenAI API (chat logprobs: `content[]` entries; completions:
parallel lists), and the envelope of a non-streamed answer."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import lru_cache

from fastapi.responses import JSONResponse

from ..engine import RequestOutput


def token_text_of(tokenizer) -> Callable[[int], str]:
    """id -> the text of that token alone (what vLLM reports as `token`), cached."""

    @lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return token_text


def _finite(x: float) -> float:
    # JSON has no -inf; a masked-out top token would otherwise break the response
    return x if math.isfinite(x) else -9999.0


def chat_logprob_entries(token_text: Callable[[int], str], logprobs, top_n: int) -> list[dict]:
    out = []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        entry = {"token": tok, "logprob": _finite(lp.logprob), "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
        for top in lp.top[:top_n]:
            t = token_text(top.token_id)
            entry["top_logprobs"].append({"token": t, "logprob": _finite(top.logprob),
                                          "bytes": list(t.encode("utf-8"))})
        out.append(entry)
    return out


def completion_logprobs(token_text: Callable[[int], str], logprobs, top_n: int, offset0: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    for lp in logprobs:
        tok = token_text(lp.token_id)
        tokens.append(tok)
        token_lps.append(_finite(lp.logprob))
        top = {}
        for t in lp.top[:top_n]:
            top.setdefault(token_text(t.token_id), _finite(t.logprob))
        tops.append(top if top_n else None)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def whole_response(response_id: str, obj: str, model_id: str, finals: list[RequestOutput], choices: list) -> JSONResponse:
    completion_tokens = sum(len(o.token_ids) for f in finals for o in f.outputs)
    use = usage(sum(len(f.prompt_token_ids) for f in finals), completion_tokens, sum(f.num_cached_tokens for f in finals))
    return JSONResponse({"id": response_id, "object": obj, "created": int(time.time()), "model": model_id,
                         "choices": choices, "usage": use, "system_fingerprint": None})
