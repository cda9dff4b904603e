"""``GET /metrics``: the deployment's Prometheus metrics, asked of the front end (its client
``metrics`` request; docs/design.md, "Metrics").

Open like ``/health`` even when ``--api-key`` is set, as vLLM leaves it: a Prometheus server
scrapes without the API's bearer token, and the metrics carry no prompt or output. Put the
HTTP port behind a proxy that restricts ``/metrics`` where that matters.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api_server.backend import FrontendBridge, FrontendError, Message, next_reply, raise_if_error
from api_server.state import ServerState


async def fetch_metrics(bridge: FrontendBridge, timeout_s: float) -> str:
    """The front end's ``metrics`` reply text; ``FrontendError`` (503) when it does not answer."""
    rid = bridge.new_rid("metrics")
    replies: asyncio.Queue[Message] = asyncio.Queue()
    bridge.submit({"type": "metrics", "rid": rid}, replies)
    try:
        reply = raise_if_error(await next_reply(replies, timeout_s))
    finally:
        bridge.release(rid, abort=False)
    text = reply.get("text")
    if reply.get("type") != "metrics" or not isinstance(text, str):
        kind = reply.get("type")
        raise FrontendError("internal", f"the front end answered a metrics request with {kind!r}")
    return text


def metrics_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        """The Prometheus text exposition of the front end's and every instance's metrics."""
        text = await fetch_metrics(state.bridge, state.config.health_timeout_s)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return router
