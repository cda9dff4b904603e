"""SGLang's native ``POST /generate``: ``{"text" | "input_ids", "sampling_params", "stream",
"return_logprob"}`` → ``{"text", "output_ids", "meta_info"}``; streamed as server-sent events
whose ``text`` and ``output_ids`` are cumulative, as SGLang sends them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api_server.errors import invalid
from api_server.generation import GenerateSpec, Output, RequestGroup
from api_server.protocol import GenerateRequest
from api_server.sampling import native_sampling, parse_body
from api_server.state import ServerState
from api_server.streaming import stream_response


def native_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/generate", response_model=None)
    async def generate(request: Request) -> dict[str, Any] | StreamingResponse:
        req = parse_body(GenerateRequest, await request.body())
        if (req.text is None) == (req.input_ids is None):
            raise invalid("give exactly one of text and input_ids", "text")
        spec = GenerateSpec(req.text, req.input_ids, native_sampling(req.sampling_params), req.return_logprob)
        group = RequestGroup(state.bridge, request.receive, "generate")
        if req.stream:
            return await stream_response(group, [spec], NativeChunks(req.return_logprob))
        async with group:
            group.start([spec], stream=False)
            [output] = await group.results()
        return native_response(output, req.return_logprob)

    return router


def native_response(out: Output, return_logprob: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "finish_reason": {"type": out.finish_reason} if out.finish_reason else None,
        "prompt_tokens": out.usage.get("prompt_tokens"),
        "completion_tokens": out.usage.get("completion_tokens", len(out.token_ids)),
        "cached_tokens": out.usage.get("cached_tokens"),
        **out.metrics,
    }
    if return_logprob:  # SGLang's (logprob, token id, token text) triples; no token texts here
        pairs = zip(out.logprobs, out.token_ids, strict=True)
        meta["output_token_logprobs"] = [[lp, token_id, None] for lp, token_id in pairs]
    return {"text": out.text, "output_ids": out.token_ids, "meta_info": meta}


@dataclass
class NativeChunks:
    """Each chunk carries the answer so far."""

    return_logprob: bool
    _so_far: Output = field(default_factory=Output, init=False)

    def opening(self, count: int) -> list[dict[str, Any]]:
        return []

    def chunks(self, index: int, msg: dict[str, Any]) -> list[dict[str, Any]]:
        self._so_far.add(msg)
        return [native_response(self._so_far, self.return_logprob)]

    def closing(self, outputs: list[Output]) -> list[dict[str, Any]]:
        return []
