"""JSON errors as docs/API.md lists them: `{"error": {"message", "type", "code", ...}}` with the right status.

Service errors carry a `type`; this module maps types to HTTP codes, so the service never thinks in HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.service import ServiceError

logger = logging.getLogger(__name__)

STATUS_BY_TYPE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden_host": 403,
    "not_found": 404,
    "model_not_found": 404,
    "method_not_allowed": 405,
    "wrong_state": 409,
    "swarm_unavailable": 503,
    "swarm_timeout": 503,
    "engine_not_ready": 503,
    "internal_error": 500,
}


def error_body(status: int, error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"message": message, "type": error_type, "code": status, **extra}}


def error_response(status: int, error_type: str, message: str, headers=None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(status, error_type, message, **extra), status_code=status, headers=headers)


def service_error_body(exc: ServiceError) -> tuple[int, dict[str, Any]]:
    """(status, body) for a service error; also used inside SSE streams after the headers went out."""
    status = STATUS_BY_TYPE.get(exc.type, 500)
    return status, error_body(status, exc.type, str(exc), **exc.extra())


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            return "The request body is not valid JSON."
        location = ".".join(str(x) for x in error.get("loc", ()) if x != "body")
        message = error.get("msg", "invalid")
        if "unable to parse raw data as a unicode string" in message:  # pydantic's words for a lone surrogate
            message = "contains a lone UTF-16 surrogate: send each character whole"
        parts.append(f"{location or 'body'}: {message}")
    return "Invalid request: " + "; ".join(parts) if parts else "Invalid request."


def install_error_handlers(app: FastAPI) -> None:
    """Turn every failure into the documented JSON shape (FastAPI's 422 becomes our 400)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, "invalid_request", _describe_validation(exc))

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        status, body = service_error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = f"There is no endpoint {request.method} {request.url.path}; see /openapi.json."
        error_type = kinds.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error"
        )
        return error_response(exc.status_code, error_type, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        # Close the connection: after an unexpected failure its state cannot be trusted for the next request.
        return error_response(
            500,
            "internal_error",
            f"The engine hit an unexpected error: {exc!r}",
            headers={"Connection": "close"},
        )
