"""The OpenAI error envelope `{"error": {message, type, param, code}}` for every failure the server reports.

Clients (the openai SDK, LangChain) map the HTTP status to an exception class and show `message`, so each error
names what was wrong: the field, the served model ids, both token counts of a context overflow.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def context_overflow(max_model_len: int, prompt_tokens: int, max_tokens: int | None, what: str) -> APIError:
    """vLLM's wording, which downstream clients pattern-match ("maximum context length is N tokens")."""
    if max_tokens is None:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your request has "
               f"{prompt_tokens} input tokens. Please reduce the length of the input {what}.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
               f"completion). Please reduce the length of the {what} or completion.")
    return APIError(400, msg, param=what, code="context_length_exceeded")


def _loc(loc) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for p in (str(p) for p in loc if p != "body"):
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming each bad field, and the first field as `param`."""
    items, first = [], None
    for err in errors[:5]:
        loc = _loc(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            items.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        first = first or loc or None
        items.append(f"{loc or 'body'}: {err.get('msg', 'invalid value')}")
    return "; ".join(items) or "invalid request", first


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(400, message, param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError):
        return JSONResponse(error_body(400, f"request body is not valid JSON: {exc}"), status_code=400)

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError):  # engine-side checks (SamplingParams, token ids)
        return JSONResponse(error_body(400, str(exc), None, "invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)
