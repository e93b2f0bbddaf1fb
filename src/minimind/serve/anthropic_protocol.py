"""Wire schemas of the Anthropic Messages API (POST /v1/messages, POST /v1/messages/count_tokens): the fields a
text model can serve; unknown fields are ignored (cache_control, service_tier, ...), as in the rest of the API."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .protocol import Bool, Float, Int


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class MediaBlock(BaseModel):
    """image / document blocks: accepted by the schema, refused with a 400 (this model reads text only)."""

    type: Literal["image", "document"]
    source: dict[str, Any] | None = None


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | MediaBlock, Field(discriminator="type")]] | None = None
    is_error: Bool | None = None


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | MediaBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = Field(default=None, description="server tools (any type but `custom`) are ignored")


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: Bool | None = None


class Thinking(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Int | None = Field(default=None, ge=0)


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    format: OutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(BaseModel):
    model: str = Field(description="a served model id")
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = Field(default=None, description="enabled / adaptive render the prompt with "
                                                                "thinking on, disabled with it off")
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: Float | None = Field(default=None, ge=0, le=1)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=0)
    stream: Bool = False
    metadata: dict[str, Any] | None = None


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
