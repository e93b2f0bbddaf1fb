"""What every generation endpoint shares: the ServingContext (served engines, grammars, auth, limits, the tokenizer
pool; passed explicitly, never global), request -> checked (prompt token ids, SamplingParams) with every 4xx raised
before the response starts, the submission of a response's engine requests, and their final outputs."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from ..engine import RequestOutput, SamplingParams
from ..text.template import render_prompt
from .engine_client import AsyncEngine, RequestHandle
from .errors import APIError
from .limits import ServeLimits
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

MEDIA_PARTS = {"image_url": "image", "input_image": "image", "image": "image", "input_audio": "audio",
               "audio": "audio", "file": "file", "input_file": "file", "video": "video", "video_url": "video"}


def part_text(part, where: str) -> str:
    """The text of one content part; any other part is a 400 (dropping it would answer a different question)."""
    if part.type == "text":
        return part.text or ""
    kind = MEDIA_PARTS.get(part.type)
    if kind is not None:
        raise APIError(400, f"this model reads text only; {where} is an `{part.type}` part: {kind} content is not "
                            "supported", param=where, code="unsupported_content")
    raise APIError(400, f"{where}: content part type `{part.type}` is not supported; this model reads `text` parts "
                        "only", param=where, code="unsupported_content")


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the dicts MiniMind's chat templates read (text parts joined; `developer` = system)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            content = "".join(part_text(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
        d = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def open_thinking_of(req) -> bool | None:
    """chat_template_kwargs.open_thinking / enable_thinking (the names minimind-3 / 2510 read), or the original
    server's top-level `open_thinking`. None = the template's own default."""
    kwargs = req.chat_template_kwargs or {}
    for key in ("open_thinking", "enable_thinking"):
        if key in kwargs and kwargs[key] is not None:
            return bool(kwargs[key])
    return getattr(req, "open_thinking", None)


@dataclass(frozen=True)
class PromptLimit:
    max_model_len: int
    max_chars: int | None  # None: not checked before tokenizing
    configured: bool = False  # max_chars is the server's max_prompt_chars, not derived from the context


def check_prompt_chars(text: str, limit: PromptLimit, what: str) -> None:
    """A prompt longer than limit.max_chars characters cannot fit the context: 400 before it is tokenized (the
    tokenizer's time and memory grow with the text), in the wording of the token-count check."""
    if limit.max_chars is None or len(text) <= limit.max_chars:
        return
    bound = (f"this server accepts at most {limit.max_chars} characters (max_prompt_chars)" if limit.configured
             else f"more than fit in that context (at most {limit.max_chars} characters)")
    raise APIError(400, f"This model's maximum context length is {limit.max_model_len} tokens. However, your "
                        f"request has {len(text)} characters of input, {bound}. Please reduce the length of the "
                        f"input {what}.", param=what, code="context_length_exceeded")


def chat_prompt(tokenizer, req: ChatCompletionRequest, limit: PromptLimit | None = None) -> tuple[str, list[int]]:
    """The rendered prompt and its token ids (runs on the tokenizer pool: both cost time linear in the text)."""
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    messages = message_dicts(req.messages)
    try:
        text = render_prompt(tokenizer, messages, tools=tools, open_thinking=open_thinking_of(req),
                             add_generation_prompt=req.add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # noqa: BLE001 - jinja errors from a message the template cannot render
        raise APIError(400, f"messages could not be rendered by the chat template: {exc}", param="messages") from None
    del messages  # joined content parts are copies: not kept while tokenizing
    if limit is not None:
        check_prompt_chars(text, limit, "messages")
    return text, list(tokenizer.encode(text, add_special_tokens=False))


def prompt_list(req: CompletionRequest) -> list:
    """`prompt` may be a string, a list of strings, token ids, or a list of token-id lists: one entry per prompt."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return [p] if all(isinstance(x, int) for x in p) else list(p)


def completion_prompts(tokenizer, prompts: list, limit: PromptLimit | None = None) -> list[list[int]]:
    """Token ids of each of prompt_list()'s prompts; every text is checked against the limit before any is
    tokenized (runs on the tokenizer pool)."""
    if limit is not None:
        for x in prompts:
            if isinstance(x, str):
                check_prompt_chars(x, limit, "prompt")
    return [list(tokenizer.encode(x, add_special_tokens=False)) if isinstance(x, str) else list(x) for x in prompts]


def check_stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")


def check_prompt(ids: list[int], vocab_size: int, what: str) -> None:
    if not ids:
        raise APIError(400, f"the {what} is empty after tokenization", param=what)
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise APIError(400, f"token id out of range for the vocabulary of {vocab_size}", param=what)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, what: str) -> int:
    """vLLM's rule: no max_tokens = the rest of the context; too many = 400 naming both numbers, in vLLM's wording,
    which downstream clients pattern-match ("maximum context length is N tokens")."""
    if prompt_len >= max_model_len and requested is None:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your request has "
               f"{prompt_len} input tokens. Please reduce the length of the input {what}.")
    elif requested is not None and prompt_len + requested > max_model_len:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
               f"completion). Please reduce the length of the {what} or completion.")
    else:
        return max_model_len - prompt_len if requested is None else requested
    raise APIError(400, msg, param=what, code="context_length_exceeded")


def sampling_params(req: SamplingFields, *, max_tokens: int, vocab_size: int, logprobs: int | None,
                    defaults=None) -> SamplingParams:
    """defaults: the model's SamplingDefaults, for the sampling fields a request leaves out (as vLLM's
    `--generation-config auto`); without them the OpenAI API's (temperature 1, no filtering)."""
    def pick(name, fallback):
        value = getattr(req, name)
        return getattr(defaults, name, fallback) if value is None else value

    bias = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            if not 0 <= token < vocab_size:
                raise APIError(400, f"logit_bias token id {token} is outside the vocabulary of {vocab_size}",
                               param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
            bias[token] = float(value)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 0)), min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            presence_penalty=float(pick("presence_penalty", 0.0)),
            frequency_penalty=float(pick("frequency_penalty", 0.0)), logit_bias=bias,
            seed=None if req.seed is None else req.seed & 0x7FFFFFFF, stop=[s for s in stop if s] or None,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


@dataclass
class ServingContext:
    engines: dict[str, AsyncEngine]  # served model id -> engine; the first is the base model
    api_key: str | None = None
    metrics: object | None = None
    guided: object | None = None  # GuidedDecoding when a grammar library is installed
    limits: ServeLimits = field(default_factory=ServeLimits)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @property
    def base_model(self) -> str:
        return next(iter(self.engines))

    def engine_for(self, model: str | None) -> tuple[str, AsyncEngine]:
        if model is None or model == "":
            return self.base_model, self.engines[self.base_model]
        if model not in self.engines:
            served = ", ".join(f"`{m}`" for m in self.engines)
            raise APIError(404, f"The model `{model}` does not exist. Served models: {served}.", param="model",
                           code="model_not_found")
        return model, self.engines[model]

    async def offload(self, fn, *args):
        """fn(*args) on the tokenizer pool (limits.tokenizer_workers threads), so that rendering and tokenizing a
        long prompt holds up neither /health nor the streams the event loop is sending."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.limits.tokenizer_workers, thread_name_prefix="minimind-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Stop the tokenizer pool (app shutdown); a later offload() starts a new one."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def prompt_limit(self, engine: AsyncEngine) -> PromptLimit:
        chars = self.limits.max_prompt_chars
        if chars is not None:
            return PromptLimit(engine.max_model_len, chars, configured=True)
        longest = engine.longest_token_chars
        return PromptLimit(engine.max_model_len, None if longest is None else engine.max_model_len * longest)

    def check_request(self, engine: AsyncEngine, req: SamplingFields, num_prompts: int, what: str) -> None:
        """The limits a request can be checked against before its prompt is tokenized: 400 for what could never
        be served (429 is only for a server that is busy now). Completions (prompts x n) are counted against the
        engine's capacity: each one takes a KV slot of its own while it runs and waits in the queue otherwise."""
        capacity, wanted = engine.capacity, num_prompts * req.n
        if wanted > capacity:
            param = what if num_prompts > capacity or req.n == 1 else "n"
            asks = f"{num_prompts} prompts x n={req.n}" if num_prompts > 1 else f"n={req.n}"
            raise APIError(400, f"this request asks for {wanted} completions ({asks}); this server holds at most "
                                f"{capacity} at once (max_num_seqs {engine.llm.max_num_seqs} + max_queue "
                                f"{engine.max_queue}): send fewer prompts or a smaller n", param=param)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        lim = self.limits
        if len(stop) > lim.max_stop_strings:
            raise APIError(400, f"stop has {len(stop)} strings; at most {lim.max_stop_strings} are allowed",
                           param="stop")
        longest = max(map(len, stop), default=0)
        if longest > lim.max_stop_chars:
            raise APIError(400, f"stop strings may have at most {lim.max_stop_chars} characters; one has {longest}",
                           param="stop")

    def requests_for(self, engine: AsyncEngine, req: SamplingFields, prompts: list[list[int]], what: str,
                     max_tokens: int | None, logprobs: int | None, unavailable: str):
        """[(prompt ids, SamplingParams)] of each prompt. unavailable: the 400 for a json response_format when no
        grammar library is installed."""
        vocab, fmt = engine.llm.config.vocab_size, req.response_format
        jobs: list[tuple[list[int], SamplingParams]] = []
        for ids in prompts:
            check_prompt(ids, vocab, what)
            budget = resolve_max_tokens(max_tokens, len(ids), engine.max_model_len, what)
            params = sampling_params(req, max_tokens=budget, vocab_size=vocab, logprobs=logprobs,
                                     defaults=engine.llm.sampling_defaults)
            if fmt is not None and fmt.type != "text":
                if self.guided is None:
                    raise APIError(400, unavailable, param="response_format")
                self.guided.attach(engine, params, fmt)
            jobs.append((ids, params))
        return jobs


def submit(engine: AsyncEngine, jobs: list, base_id: str, stream: bool) -> list[RequestHandle]:
    """One engine request per job, all read through one collector (handle k's outputs have key k), so a response
    takes its prompts' outputs as they come. All or none: a refused one aborts those already submitted."""
    handles: list[RequestHandle] = []
    try:
        for k, (ids, params) in enumerate(jobs):
            collector = handles[0].collector if handles else None
            handles.append(engine.submit(ids, params, f"{base_id}-{k}", stream=stream, collector=collector, k=k))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    return handles


async def final_outputs(request: Request, handles: list[RequestHandle]) -> list[RequestOutput]:
    """The final outputs of a non-streamed response's requests. They are aborted on any error, and as soon as the
    client goes away, even while they still wait in the queue: nothing is sent before the answer is ready, so
    nothing else would notice."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.abort()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        left = len(handles)
        while left:
            k, out = await handles[0].collector.get()  # only final outputs are handed over for these
            if out.finished and handles[k].final is None:
                handles[k].final = out
                left -= 1
        return [h.final for h in handles]
    finally:
        watcher.cancel()
        for h in handles:
            h.abort()
