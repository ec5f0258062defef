"""One handler for every error: ``{"error": {"code", "message"}}`` with a fitting status."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from autodispatch.domain.errors import AppError, TooManyRequests

log = structlog.get_logger("autodispatch.api")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def describe_validation(exc: RequestValidationError | ValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed_json", "the request body is not valid JSON"
    messages = []
    for e in errors[:5]:
        where = _location(tuple(e.get("loc", ())))
        if e.get("type") == "extra_forbidden":
            messages.append(f"{where}: unknown field; remove it")
        elif e.get("type") == "missing":
            messages.append(f"{where}: required field is missing")
        else:
            messages.append(f"{where}: {e.get('msg')}")
    return 422, "invalid_input", "; ".join(messages)


def install(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        headers = None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        if exc.status >= 500:
            log.error("request_failed", code=exc.code, message=exc.message)
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = describe_validation(exc)
        return error_response(status, code, message)

    @app.exception_handler(ValidationError)
    async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
        status, code, message = describe_validation(exc)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"there is no route {request.method} {request.url.path}"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message)
