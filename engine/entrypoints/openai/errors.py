"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: the
mapping from lmarith's exceptions to statuses, and the FastAPI handlers that answer every
failure (bad JSON and schema, unknown routes, unexpected exceptions) in that shape, so one
bad request never takes the server down and clients always get a parseable body."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import (CacheExhaustedError, EngineError, FormulaError, LmarithError,
                       ModelLoadError, PromptError, RequestAbortedError, SamplingParamsError)
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("lmarith.server")


class APIError(Exception):
    """An error to answer with: HTTP status, OpenAI error type, the offending field, a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_exception(error: BaseException, formula_param: Optional[str] = None,
                   prompt_param: str = "prompt") -> APIError:
    """The APIError for an exception raised while serving a request. formula_param names the
    request field a FormulaError is about ("formula" when the body gave one); prompt_param
    the field a PromptError is about ("prompt", or "messages" for chat)."""
    if isinstance(error, APIError):
        return error
    message = str(error) or type(error).__name__
    if isinstance(error, FormulaError):
        return APIError(400, message, param=formula_param, code="invalid_formula")
    if isinstance(error, SamplingParamsError):
        return APIError(400, message, param=_sampling_field(message), code="invalid_sampling_params")
    if isinstance(error, PromptError):
        return APIError(400, message, param=prompt_param, code="invalid_prompt")
    if isinstance(error, CacheExhaustedError):
        return APIError(400, message, param="max_tokens", code="kv_cache_exhausted")
    if isinstance(error, RequestAbortedError):
        return APIError(503, message, type="server_error", code="request_aborted")
    if isinstance(error, (EngineError, ModelLoadError, LmarithError)):
        return APIError(500, message, type="server_error", code="engine_error")
    log.exception("unexpected error while serving a request", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__}: {message})",
                    type="server_error", code="internal_error")


SAMPLING_FIELDS = ("temperature", "max_tokens", "top_k", "top_p", "min_p", "seed", "stop_token_ids",
                   "stop", "ignore_eos", "logprobs")


def _sampling_field(message: str) -> Optional[str]:
    """SamplingParamsError messages start with the field's name."""
    return next((name for name in SAMPLING_FIELDS if message.startswith(name)), None)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc) -> str:
    """A pydantic error location as the body's field path ("messages.0.role"), without the
    "body" root and the type tags pydantic adds inside unions ("prompt.str" -> "prompt")."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for p in parts if p.lower() not in _TYPE_TAGS and "[" not in p and not p[:1].isupper()]
    return ".".join(parts)


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for bad JSON or a bad field becomes OpenAI's 400 invalid_request_error."""
    problems = error.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON: {first.get('msg', '')}", None
    else:
        param = _field_path(first.get("loc", ())) or None
        lines = dict.fromkeys(f"{_field_path(e.get('loc', ())) or 'body'}: {e.get('msg', '')}"
                              for e in problems[:5])
        message = "; ".join(lines)
    return APIError(400, message or "invalid request", param=param).response()


def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    response = APIError(error.status_code, str(error.detail), type=kind, code=code).response()
    response.headers.update(getattr(error, "headers", None) or {})
    return response


def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return from_exception(error).response()


def install_handlers(app: FastAPI) -> None:
    """Answer every failure with OpenAI's error body."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
