"""Typed API errors and the handlers that render every error in OpenAI's shape (`protocol.error_body`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.protocol import error_body

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    """404 for a model id this server does not serve, in OpenAI's words (a long id cut short in the message)."""
    shown = model if len(model) <= 128 else model[:128] + "..."
    return APIError(404, f"The model `{shown}` does not exist.", "not_found_error", "model", "model_not_found")


def overloaded(message: str) -> APIError:
    """429: the waiting queue is full. OpenAI's rate-limit type, so clients' retry-with-backoff applies."""
    return APIError(429, f"server busy: {message}", "rate_limit_error", code="overloaded", headers={"Retry-After": "1"})


def unsupported(param: str, what: str) -> APIError:
    return bad_request(f"{param} is not supported by this server: {what}", param, "unsupported_parameter")


def engine_unavailable(message: str = "the engine is not running") -> APIError:
    return APIError(503, message, "server_error", code="engine_unavailable")


def render(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return render(bad_request(f"malformed JSON body: {first.get('msg', '')}", code="invalid_json"))
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            return render(bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"))
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return render(bad_request(message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return render(APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return render(APIError(500, "internal server error", "server_error", code="internal_error"))
