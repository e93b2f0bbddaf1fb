"""POST /v1/embeddings. A text's embedding is the mean of the model's last-layer hidden states (after the final norm)
over its tokens, scaled to unit length as OpenAI's and Ollama's embeddings are (a dot product is then the cosine
similarity). Each input is one prefill-only engine request (SamplingParams(max_tokens=0, embed=True)), so
embeddings batch with every other request on the engine thread, the model's only user. `dimensions` other than the
model's hidden size is a 400 (the vectors are not trained to be truncated); encoding_format "base64" sends the
little-endian float32 bytes base64-encoded, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from ..engine import SamplingParams
from . import context as cx
from .context import ServingContext
from .errors import APIError
from .protocol import ErrorResponse, Int, random_id


class EmbeddingRequest(BaseModel):
    model: str | None = Field(default=None, description="a served model id (default: the base model)")
    input: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="a text, texts, token ids, or lists of token ids: one embedding each")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(default=None, ge=1, description="only the model's hidden size is accepted")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class _Unwatched:
    """Stands in for the HTTP request of a caller that does not watch for the client going away."""

    async def receive(self):
        await asyncio.Event().wait()


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


async def embed(ctx: ServingContext, engine, inputs: list[str] | list[list[int]], *, truncate: bool = False,
                raw: Request | None = None) -> tuple[list[list[float]], int]:
    """-> (one unit-length vector per input, prompt tokens in all). An input longer than the context is a 400, or
    with truncate its first max_model_len tokens. raw: the HTTP request, whose disconnect aborts the work."""
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    if len(inputs) > engine.capacity:
        raise APIError(400, f"input has {len(inputs)} entries; this server embeds at most {engine.capacity} at once",
                       param="input")
    if not truncate:
        limit = ctx.prompt_limit(engine)
        for x in inputs:
            if isinstance(x, str):
                cx.check_prompt_chars(x, limit, "input")
    if any(isinstance(x, str) for x in inputs):
        if engine.tokenizer is None:
            raise APIError(400, "this model is served without a tokenizer: send token ids", param="input")
        ids = await ctx.offload(cx.completion_prompts, engine.tokenizer, inputs)
    else:
        ids = [list(x) for x in inputs]
    most, jobs = engine.max_model_len, []
    for i, x in enumerate(ids):
        cx.check_prompt(x, engine.llm.config.vocab_size, "input")
        if len(x) > most and not truncate:
            raise APIError(400, f"This model's maximum context length is {most} tokens. However, input {i} has "
                                f"{len(x)} tokens. Please reduce the length of the input.", param="input",
                           code="context_length_exceeded")
        jobs.append((x[:most], SamplingParams(max_tokens=0, embed=True)))
    handles = cx.submit(engine, jobs, random_id("embd"), stream=False)
    finals = await cx.final_outputs(raw or _Unwatched(), handles)
    if any(f.embedding is None for f in finals):  # aborted: the server is shutting down
        raise APIError(503, "the embedding requests were aborted", code="aborted")
    return [_unit(f.embedding) for f in finals], sum(len(f.prompt_token_ids) for f in finals)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def add_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503)})
    async def embeddings(req: EmbeddingRequest, raw: Request):
        """Embeddings: the mean of the last-layer hidden states over each input's tokens, unit length."""
        model_id, engine = ctx.engine_for(req.model)
        hidden = engine.llm.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions and cannot be "
                                "shortened", param="dimensions")
        inputs = req.input
        if isinstance(inputs, str) or (inputs and all(isinstance(x, int) for x in inputs)):
            inputs = [inputs]
        vectors, tokens = await embed(ctx, engine, inputs, raw=raw)
        data = [Embedding(embedding=_encode(v, req.encoding_format), index=i) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=model_id, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                 total_tokens=tokens))
