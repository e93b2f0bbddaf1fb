"""Wire schemas of the OpenAI-compatible API (requests validated by pydantic, responses documented in /docs).

Field names and defaults follow the OpenAI API and vLLM's extensions (top_k, min_p, repetition_penalty,
chat_template_kwargs, ...). Unknown request fields are ignored (pydantic's default), as OpenAI does. Bounds live
here so a bad value is a 400 that names the field before anything reaches the engine. Types are strict where the
OpenAI API's are (Bool, Int, Float below): "yes" is no boolean and "2" no integer; a number must be finite (JSON
parsers read NaN and Infinity, which no bound check catches).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, Field, Strict, StrictBool, StrictInt

Bool = StrictBool
Int = StrictInt
Float = Annotated[float, Strict(), AllowInfNan(False)]  # an integer is a number too; NaN and inf are not


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False


class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaSpec(BaseModel):
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class SamplingFields(BaseModel):
    """Sampling fields common to chat and text completions."""

    model: str | None = Field(default=None, description="a served model id (default: the base model)")
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=100)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: Float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Float | None = Field(default=None, gt=0, le=100)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    seed: Int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    n: Int = Field(default=1, ge=1, le=64)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: Bool = False
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    response_format: ResponseFormat | None = None


class TextPart(BaseModel):
    type: str = "text"
    text: str | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    open_thinking: Bool | None = Field(default=None, description="the original MiniMind server's flag")
    add_generation_prompt: Bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    # 0: generate nothing; with echo and logprobs, the prompt's own logprobs alone (scoring)
    max_tokens: Int | None = Field(default=None, ge=0)
    logprobs: Int | None = Field(default=None, ge=0, le=20)
    echo: Bool = Field(default=False, description="the prompt before the completion; with `logprobs`, the prompt "
                                                  "tokens' logprobs too (the first token's null)")
    suffix: str | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minimind"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = False
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[Int]


class DetokenizeResponse(BaseModel):
    prompt: str


class SimpleChatRequest(BaseModel):
    """The seeds' FastAPI `POST /chat` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int = Field(default=512, ge=1)
    temperature: Float = Field(default=0.85, ge=0, le=100)


class SimpleChatResponse(BaseModel):
    response: str
