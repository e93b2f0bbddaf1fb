"""`minimind serve`: an OpenAI-compatible HTTP API over the continuous-batching engine.

create_app(engines) builds the FastAPI app around engines it is given (no module globals); launch.py is the
command line (the same model flags as `minimind chat`; 127.0.0.1 by default).
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..text.reply import parse_reply
from ..text.template import render_prompt
from . import anthropic, embeddings, ollama, responses, scoring
from . import protocol as p
from .completions import create_chat_completion, create_completion, prepare_chat
from .context import ServingContext, final_outputs, message_dicts, open_thinking_of, submit
from .engine_client import AdapterEngine, AsyncEngine
from .errors import APIError, error_body_for, install_handlers
from .guards import BodyLimit, HostGuard
from .limits import ServeLimits

ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 429, 500, 503)}
# "/" answers "Ollama is running" (serve/ollama.py), the probe Ollama clients send before they authenticate
PUBLIC_PATHS = frozenset(("/", "/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"))
# with `stream: true` the two completion endpoints answer 200 with an SSE stream instead of the JSON body
_SSE = "`data: {%s JSON}` events (one per line pair), the last one `data: [DONE]`"
STREAMING = {kind: {**ERRORS, 200: {"description": "the completion; with `stream: true` an SSE stream",
                                    "content": {"text/event-stream": {"schema": {"type": "string",
                                                                                 "description": _SSE % kind}}}}}
             for kind in ("chat.completion.chunk", "text_completion")}


def _as_engines(engine, served_model_name: str | None, max_queue: int) -> dict[str, AsyncEngine]:
    if not isinstance(engine, dict):
        engine = {served_model_name or "minimind": engine}
    engines = {name: e if isinstance(e, AsyncEngine) else AsyncEngine(e, max_queue=max_queue)
               for name, e in engine.items()}
    for e in list(engines.values()):  # each LoRA adapter loaded in an engine is a model id of its own
        for adapter in getattr(e.llm, "lora_names", {}):
            if adapter in engines:
                raise ValueError(f"LoRA adapter name {adapter!r} is already a served model id")
            engines[adapter] = AdapterEngine(e, adapter)
    return engines


def create_app(engine, *, served_model_name: str | None = None, api_key: str | None = None, max_queue: int = 256,
               guided=None, metrics: bool = True, drain_timeout: float = 30.0,
               limits: ServeLimits | None = None) -> FastAPI:
    """engine: an LLM (not started), an AsyncEngine, or {model id: either} (the first is the base model; LoRA
    adapters are further ids). guided: a GuidedDecoding for response_format (None = try llguidance)."""
    if api_key == "":  # an empty key would turn auth off without a word
        raise ValueError("api_key is empty: give a key, or None to serve without one")
    engines = _as_engines(engine, served_model_name, max_queue)
    if guided is None:
        from .guided import GuidedDecoding

        guided = GuidedDecoding.create()
    from .metrics import ServerMetrics

    ctx = ServingContext(engines, api_key=api_key, metrics=ServerMetrics() if metrics else None,
                         guided=guided or None, limits=limits or ServeLimits())
    shared = {n: e for n, e in engines.items() if isinstance(e, AsyncEngine)}  # the LoRA adapters' ids run on these
    for e in shared.values():  # read now, not on the first request (a GGUF's metadata takes seconds to parse)
        e.llm.sampling_defaults  # noqa: B018
    if ctx.metrics is not None:  # one hook per engine: a LoRA adapter's requests count under its base model's id
        for name, e in shared.items():
            ctx.metrics.attach(name, e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for e in shared.values():
            e.start()
        yield
        for e in shared.values():  # graceful: running requests finish, new ones get 503
            e.accepting = False
        for e in shared.values():
            await e.drain(drain_timeout)
        ctx.close()

    app = FastAPI(title="minimind serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for MiniMind checkpoints")
    app.state.ctx = ctx
    install_handlers(app)
    limits = ctx.limits  # added innermost first: AuthAndCount (outermost) counts the guards' refusals too
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if limits.allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed_hosts=limits.allowed_hosts)
    app.add_middleware(AuthAndCount, ctx=ctx)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses=STREAMING["chat.completion.chunk"])
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request):
        """Chat completion; with `stream: true` an SSE stream of chat.completion.chunk objects ending in [DONE]."""
        return await create_chat_completion(ctx, req, raw)

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses=STREAMING["text_completion"])
    async def completions(req: p.CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        base = ctx.base_model
        return p.ModelList(data=[p.ModelCard(id=name, root=name, parent=None if name == base else base,
                                             max_model_len=e.max_model_len) for name, e in engines.items()])

    @app.get("/v1/models/{model_id}", response_model=p.ModelCard, responses=ERRORS)
    async def model_card(model_id: str):
        name, e = ctx.engine_for(model_id)
        return p.ModelCard(id=name, root=name, max_model_len=e.max_model_len)

    @app.get("/health")
    async def health():
        dead = [n for n, e in engines.items() if e.error is not None or not e.accepting]
        if dead:
            return JSONResponse({"status": "unavailable", "models": dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        if ctx.metrics is None:
            raise APIError(404, "metrics are disabled")
        return ctx.metrics.response()

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=ERRORS)
    async def tokenize(req: p.TokenizeRequest):
        _, e = ctx.engine_for(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")

        def token_ids() -> list[int]:  # on the tokenizer pool, as for completions: a long text stalls nothing else
            text = req.prompt
            if req.messages is not None:
                try:
                    text = render_prompt(e.tokenizer, message_dicts(req.messages), add_generation_prompt=
                                         req.add_generation_prompt, open_thinking=open_thinking_of(req))
                except Exception as exc:  # noqa: BLE001 - jinja/template errors of user input
                    raise APIError(400, f"messages could not be rendered: {exc}", param="messages") from None
            return list(e.tokenizer.encode(text, add_special_tokens=req.add_special_tokens))

        ids = await ctx.offload(token_ids)
        return p.TokenizeResponse(count=len(ids), max_model_len=e.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: p.DetokenizeRequest):
        _, e = ctx.engine_for(req.model)
        vocab = e.llm.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return p.DetokenizeResponse(prompt=e.tokenizer.decode(req.tokens))

    @app.post("/chat", response_model=p.SimpleChatResponse, responses=ERRORS)
    async def simple_chat(req: p.SimpleChatRequest, raw: Request):
        """The seeds' minimal endpoint: {messages, max_tokens, temperature} -> {"response": text}."""
        full = p.ChatCompletionRequest(messages=req.messages, temperature=req.temperature)
        _, e, jobs, _ = await prepare_chat(ctx, full)
        params = jobs[0][1]
        params.max_tokens = min(req.max_tokens, params.max_tokens)  # the seeds cut answers at the context's end
        [final] = await final_outputs(raw, submit(e, jobs, p.random_id("chat"), stream=False))
        _, content, _ = parse_reply(final.outputs[0].text, parse_tools=False)
        return p.SimpleChatResponse(response=content)

    ollama.add_routes(app, ctx)
    responses.add_routes(app, ctx)
    anthropic.add_routes(app, ctx)
    scoring.add_routes(app, ctx)
    embeddings.add_routes(app, ctx)
    return app


def _api_key(headers: list[tuple[bytes, bytes]]) -> str:
    """`Authorization: Bearer KEY`, else `x-api-key: KEY`, else ''."""
    found = {k.lower(): v for k, v in headers if k.lower() in (b"authorization", b"x-api-key")}
    auth = found.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return found.get(b"x-api-key", b"").decode("latin-1")


class AuthAndCount:
    """API-key check and per-route request counting as a plain ASGI middleware. Starlette's
    `@app.middleware("http")` (BaseHTTPMiddleware) re-streams every response body through an extra task and memory
    channel: for SSE that is one more hop per token. This one only looks at the scope and the response-start
    message and passes everything else through untouched."""

    def __init__(self, app, ctx: ServingContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = self.ctx
        guarded = ctx.api_key and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS
        if guarded and not hmac.compare_digest(_api_key(scope["headers"]).encode(), ctx.api_key.encode()):
            body = error_body_for(scope["path"])(401, "invalid or missing API key (send `Authorization: Bearer KEY` "
                                                      "or `x-api-key: KEY`)", None, "invalid_api_key")
            reply = JSONResponse(body, status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        if ctx.metrics is None:
            return await self.app(scope, receive, send)
        status = ["500"]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # the router put the matched route into the (shared) scope
            route = scope.get("route")
            ctx.metrics.http_requests.labels(scope["method"], getattr(route, "path", "other"), status[0]).inc()
