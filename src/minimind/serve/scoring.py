"""Scoring: the legacy completions logprobs object, with the prompt's own logprobs in front when a request echoes its
prompt (`echo: true` with `logprobs`, as lm-eval's loglikelihood requests send; `max_tokens: 0` scores the prompt
alone), and GET /tokenizer_info, vLLM's view of the tokenizer's configuration, with which lm-eval and other clients
tokenize through the server (/tokenize, /detokenize) instead of loading a local copy.
"""
from __future__ import annotations

from fastapi import FastAPI

from ..engine import RequestOutput
from .context import ServingContext
from .errors import APIError
from .protocol import ErrorResponse

# init_kwargs entries that are paths on the server's disk or loader switches, not tokenizer configuration
_NOT_CONFIG = frozenset(("vocab_file", "merges_file", "tokenizer_file", "name_or_path", "is_local",
                         "local_files_only", "backend"))


def completion_logprobs(token_text, entries: list, top_n: int, offset0: int = 0) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object -> (it, the text offset after its last token). entries: TokenLogprob, or the
    bare token id of a token that has no logprob (the prompt's first: null, with null top_logprobs). Each
    top_logprobs holds the chosen token and the top_n most likely (up to top_n + 1 entries, as OpenAI and vLLM);
    text_offset counts the tokens' texts from offset0."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    for entry in entries:
        scored = not isinstance(entry, int)
        tok = token_text(entry.token_id if scored else entry)
        tokens.append(tok)
        offsets.append(offset)
        offset += len(tok)
        if not scored:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(max(entry.logprob, -9999.0))  # JSON has no -inf (a masked-out token)
        top: dict[str, float] = {}
        for t in entry.top[:top_n]:
            top.setdefault(token_text(t.token_id), max(t.logprob, -9999.0))
        top.setdefault(tok, token_lps[-1])
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def prompt_entries(out: RequestOutput) -> list:
    """completion_logprobs() entries of an output's prompt: its first token's id, then the prompt's logprobs."""
    if out.prompt_logprobs is None:  # aborted before its prompt was computed
        return []
    return [out.prompt_token_ids[0], *out.prompt_logprobs[1:]]


def choice_logprobs(token_text, req, final: RequestOutput, o) -> dict | None:
    """The logprobs of a whole (not streamed) completion choice: the echoed prompt's first when echo is on."""
    if req.logprobs is None:
        return None
    entries = (prompt_entries(final) if req.echo else []) + (o.logprobs or [])
    return completion_logprobs(token_text, entries, req.logprobs)[0]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    content = getattr(x, "content", None)  # an AddedToken: its text
    return content if isinstance(content, str) else str(x)


def tokenizer_info(engine) -> dict:
    """The tokenizer's configuration (tokenizer_config.json as loaded, without file paths), its class name and chat
    template, in vLLM's shape; model_max_length is the served context (max_model_len), which prompts must fit."""
    tok = engine.tokenizer
    if tok is None:
        raise APIError(404, "this model is served without a tokenizer (token-id prompts only)")
    info = _jsonable({k: v for k, v in (getattr(tok, "init_kwargs", None) or {}).items() if k not in _NOT_CONFIG})
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        if value is not None:
            info[name] = str(value)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        info["chat_template"] = template
    info.update(tokenizer_class=type(tok).__name__, model_max_length=engine.max_model_len)
    return info


def add_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/tokenizer_info", responses={code: {"model": ErrorResponse} for code in (401, 404)})
    async def get_tokenizer_info(model: str | None = None) -> dict:
        """The served model's tokenizer configuration; `model` picks a served model id (default: the base model)."""
        return tokenizer_info(ctx.engine_for(model)[1])
