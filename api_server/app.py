"""The FastAPI application: shared state, authentication, the request-body bound, errors as
OpenAI error objects, and the routes (OpenAI's in ``openai_api``, SGLang's ``/generate`` in
``native_api``, ``/metrics`` in ``metrics_api``, ``/health`` and ``/v1/models`` here)."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_server.backend import FrontendBridge, FrontendError
from api_server.config import ApiServerConfig
from api_server.errors import (
    AUTHENTICATION,
    INVALID_REQUEST,
    NOT_FOUND,
    SERVER_ERROR,
    UNAVAILABLE,
    ApiError,
    from_frontend,
    invalid,
)
from api_server.generation import ClientGone
from api_server.metrics_api import metrics_routes
from api_server.native_api import native_routes
from api_server.openai_api import openai_routes
from api_server.state import ServerState
from api_server.templates import load_chat_format

log = logging.getLogger("pdserve.api")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before its answer


def create_app(config: ApiServerConfig) -> FastAPI:
    state = ServerState(
        config=config,
        bridge=FrontendBridge(config.frontend_addr, config.response_timeout_s),
        chat_format=load_chat_format(config.model_path, config.chat_template),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.bridge.start()
        try:
            yield
        finally:
            await state.bridge.close()

    app = FastAPI(title="pdserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    protected = [Depends(_bearer_check(config.api_key))]
    app.include_router(openai_routes(state), dependencies=protected)
    app.include_router(native_routes(state), dependencies=protected)
    app.include_router(_info_routes(state))
    app.include_router(metrics_routes(state))  # open, like /health (metrics_api.py)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


def _info_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        """200 when the front end says the deployment is ready, else 503."""
        try:
            status = await state.bridge.status(state.config.health_timeout_s)
        except FrontendError as e:
            return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, e.message, UNAVAILABLE, None, e.code).response()
        if not status.get("ready"):
            return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the deployment is not ready", UNAVAILABLE,
                            None, "not_ready").response()
        return JSONResponse({"status": "ready"})

    @router.get("/v1/models", dependencies=[Depends(_bearer_check(state.config.api_key))])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @router.get("/v1/models/{model:path}", dependencies=[Depends(_bearer_check(state.config.api_key))])
    async def model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return state.model_card()

    return router


def _bearer_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses requests without the bearer token (when one is configured)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            message = "incorrect or missing API key: send 'Authorization: Bearer KEY'"
            raise ApiError(HTTPStatus.UNAUTHORIZED, message, AUTHENTICATION, None, "invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(FrontendError)
    async def frontend_error(request: Request, e: FrontendError) -> JSONResponse:
        return from_frontend(e.code, e.message).response()

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return invalid(str(e.errors()[0].get("msg", e))).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if e.status_code == HTTPStatus.NOT_FOUND else INVALID_REQUEST
        return ApiError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error", SERVER_ERROR, None,
                        "internal").response()


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` (413), by their declared length or as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, bounded_receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the request body exceeds the limit of {self.max_bytes} bytes", INVALID_REQUEST)
