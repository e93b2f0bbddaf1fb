"""Wire schemas of the OpenAI Responses API (POST /v1/responses and its companions): the text-relevant request
fields, validated as strictly as the chat API's (protocol.py); unknown fields are ignored, as OpenAI does.

Input items: messages (string content or input_text / output_text parts), function_call and function_call_output
items, and reasoning items. Tools are flat function tools (no nested `function` key).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol import Bool, Float, Int


class ContentPart(BaseModel):
    type: str = Field(description="input_text / output_text / refusal; media parts are refused with a 400")
    text: str | None = None
    refusal: str | None = None


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(BaseModel):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ContentPart] = []
    content: list[ContentPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(BaseModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class FunctionToolChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class TextConfig(BaseModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        default=None, description="`none` renders the prompt with thinking off, any other effort with it on")
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    model: str | None = Field(default=None, description="a served model id (default: the base model)")
    input: str | list[InputItem] = Field(default=[], description="a user message, or a list of input items")
    instructions: str | None = Field(default=None, description="the system message (not carried over by "
                                                                "previous_response_id)")
    max_output_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: Bool = Field(default=True, description="keep the response for GET and previous_response_id")
    previous_response_id: str | None = None
    stream: Bool = False
    include: list[str] | None = Field(default=None, description="`message.output_text.logprobs` adds logprobs")
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """The response (also the `response` of the stream's lifecycle events); request settings are echoed."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "cancelled"]
    incomplete_details: dict[str, str] | None = None
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int
