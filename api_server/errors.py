"""Errors as OpenAI's error objects (``{"error": {"message", "type", "param", "code"}}``) with the
HTTP status OpenAI gives them, and the mapping of the front end's error codes onto them."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# the front end's error codes (docs/design.md, "Wire protocol") -> (HTTP status, error type)
_FRONTEND_CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (HTTPStatus.BAD_REQUEST, INVALID_REQUEST),
    "queue_full": (HTTPStatus.TOO_MANY_REQUESTS, RATE_LIMIT),
    "shutting_down": (HTTPStatus.SERVICE_UNAVAILABLE, UNAVAILABLE),
    "peer_unavailable": (HTTPStatus.SERVICE_UNAVAILABLE, UNAVAILABLE),
    "transfer_failed": (HTTPStatus.SERVICE_UNAVAILABLE, UNAVAILABLE),
    "frontend_timeout": (HTTPStatus.SERVICE_UNAVAILABLE, UNAVAILABLE),
    "internal": (HTTPStatus.INTERNAL_SERVER_ERROR, SERVER_ERROR),
}


@dataclass
class ApiError(Exception):
    """An error answered to the HTTP client as an OpenAI error object."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid request, naming the field it is about."""
    return ApiError(HTTPStatus.BAD_REQUEST, message, INVALID_REQUEST, param, code)


def not_supported(param: str, what: str) -> ApiError:
    return invalid(f"{param}: {what} is not supported yet", param, "unsupported_parameter")


def from_frontend(code: str, message: str) -> ApiError:
    """The HTTP error of a front end ``error`` reply (an unknown code is an internal error)."""
    status, kind = _FRONTEND_CODES.get(code, (HTTPStatus.INTERNAL_SERVER_ERROR, SERVER_ERROR))
    return ApiError(status, message, kind, None, code)
