"""The error body of every failure the server reports, in the shape of the API the request was for: OpenAI's
envelope `{"error": {message, type, param, code}}` by default, Anthropic's `{"type": "error", "error": {type,
message}}` under /v1/messages, Ollama's `{"error": message}` under /api/.

Clients (the openai, anthropic and ollama SDKs, LangChain) map the HTTP status to an exception class and show the
message, so each error names what was wrong: the field, the served model ids, both token counts of a context
overflow.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   503: "overloaded_error"}


def anthropic_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "invalid_request_error"),
                                       "message": message}}


def ollama_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": message}


def error_body_for(path: str):
    """The error-body function of the API that `path` belongs to."""
    if path.startswith("/v1/messages"):
        return anthropic_error_body
    if path.startswith("/api/"):
        return ollama_error_body
    return error_body


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming each bad field (loc ("body", "messages", 0, "role") -> "messages[0].role"), and the first
    field as `param`."""
    items, first = [], None
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            items.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        loc = ""
        for p in (str(p) for p in err.get("loc", ()) if p != "body"):
            loc += f"[{p}]" if p.isdigit() else (f".{p}" if loc else p)
        first = first or loc or None
        items.append(f"{loc or 'body'}: {err.get('msg', 'invalid value')}")
    return "; ".join(items) or "invalid request", first


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    status, param, code, headers = 400, None, None, None
    if isinstance(exc, APIError):
        status, message, param, code, headers = exc.status, exc.message, exc.param, exc.code, exc.headers
    elif isinstance(exc, RequestValidationError):
        (message, param), code = validation_message(list(exc.errors())), "invalid_value"
    elif isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, str(exc.detail), exc.headers
    elif isinstance(exc, json.JSONDecodeError):
        message = f"request body is not valid JSON: {exc}"
    elif isinstance(exc, ValueError):  # engine-side checks (SamplingParams, token ids)
        message, code = str(exc), "invalid_value"
    else:
        status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
    body = error_body_for(request.url.path)(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Every exception that reaches FastAPI answers in its API's error shape (FastAPI's own handlers for validation and
    HTTP errors answer in another shape, so each of these classes is registered, not only Exception)."""
    for cls in (APIError, RequestValidationError, HTTPException, json.JSONDecodeError, ValueError, Exception):
        app.add_exception_handler(cls, _error_response)
