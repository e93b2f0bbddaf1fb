"""Wire schemas of the Ollama REST API (/api/...): requests validated by pydantic, responses documented in /docs.

Field names follow Ollama's api/types.go. Unknown fields (and unknown `options`) are ignored, as Ollama ignores
them. The sampling options carry the bounds of the OpenAI API's fields they map to (protocol.py), so a bad value
is a 400 naming `options.<name>` before anything reaches the engine.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol import Bool, Float, Int, Tool

Think = Bool | Literal["low", "medium", "high", "max"]
Format = Literal["", "json"] | dict[str, Any]
KeepAlive = str | Float  # "5m", "1h", a number of seconds; negative = forever, 0 = unload


class Options(BaseModel):
    """The runtime options that map onto our sampling; the rest of Ollama's (mirostat, num_gpu, ...) are
    accepted and ignored."""

    temperature: Float | None = Field(default=None, ge=0, le=100)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: Float | None = Field(default=None, ge=0, le=1)
    seed: Int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="negative: a random seed")
    num_predict: Int | None = Field(default=None, description="the reply's token limit; -1 or -2: no limit")
    stop: str | list[str] | None = None
    repeat_penalty: Float | None = Field(default=None, gt=0, le=100)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    num_ctx: Int | None = Field(default=None, ge=1, description="clamped to the served context length")


class ToolCallFunction(BaseModel):
    index: Int | None = None
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(BaseModel):
    id: str | None = None
    function: ToolCallFunction


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = Field(default=None, description="not supported: this model reads text only")
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class _Generating(BaseModel):
    model: str = Field(description="a served model, as `name` or `name:tag` (`minimind` = `minimind:latest`)")
    format: Format | None = Field(default=None, description='"json" or a JSON schema')
    options: Options | None = None
    think: Think | None = None
    stream: Bool = True
    keep_alive: KeepAlive | None = Field(default=None, description="accepted; the served models stay loaded")
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list, description="none: load the model (done_reason load)")
    tools: list[Tool] | None = None


class GenerateRequest(_Generating):
    prompt: str = Field(default="", description="empty: load the model (done_reason load)")
    suffix: str | None = Field(default=None, description="not supported (fill-in-the-middle)")
    system: str | None = None
    template: str | None = Field(default=None, description="not supported: the checkpoint's chat template is used")
    raw: Bool = False
    images: list[str] | None = Field(default=None, description="not supported: this model reads text only")
    context: list[Int] | None = Field(default=None, description="token ids of a previous exchange (its `context`)")


class ShowRequest(BaseModel):
    model: str | None = None
    name: str | None = Field(default=None, description="the older name of `model`")
    verbose: Bool | None = None


class EmbedRequest(BaseModel):
    model: str
    input: str | list[str] = ""
    truncate: Bool = True
    dimensions: Int | None = Field(default=None, ge=1)
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingsRequest(BaseModel):
    model: str
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive | None = None


# ---------------------------------------------------------------- responses (documentation only)
class ErrorResponse(BaseModel):
    error: str


class Metrics(BaseModel):
    done: bool
    done_reason: str | None = None
    total_duration: int | None = Field(default=None, description="nanoseconds")
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatResponse(Metrics):
    model: str
    created_at: str
    message: ResponseMessage


class GenerateResponse(Metrics):
    model: str
    created_at: str
    response: str = ""
    thinking: str | None = None
    context: list[int] | None = None


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ListedModel]


class RunningModel(ListedModel):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsResponse(BaseModel):
    embedding: list[float]
