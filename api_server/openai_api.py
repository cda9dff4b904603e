"""OpenAI's ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (server-sent
events, as OpenAI sends them) and not."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api_server.generation import RequestGroup
from api_server.protocol import ChatCompletionRequest, CompletionRequest
from api_server.responses import ChatChunks, CompletionChunks, Head, chat_response, completion_response
from api_server.sampling import check_chat, check_completion, openai_specs, parse_body
from api_server.state import ServerState
from api_server.streaming import stream_response


def openai_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
        req = parse_body(CompletionRequest, await request.body())
        state.check_model(req.model)
        check_completion(req)
        prompts = req.prompts()
        logprobs = req.logprobs is not None
        specs = openai_specs(req, prompts, req.max_tokens, logprobs, req.logprobs)
        head = Head(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        echo = [p for p in prompts if isinstance(p, str)] if req.echo else None
        group = RequestGroup(state.bridge, request.receive, "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = CompletionChunks(head, logprobs, include_usage, echo, req.n)
            return await stream_response(group, specs, chunks)
        async with group:
            group.start(specs, stream=False)
            outputs = await group.results()
        return completion_response(head, outputs, req.n, echo, logprobs)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
        req = parse_body(ChatCompletionRequest, await request.body())
        state.check_model(req.model)
        check_chat(req)
        prompt = state.chat_prompt(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_logprobs if req.logprobs else None
        specs = openai_specs(req, [prompt], max_tokens, req.logprobs, top)
        head = Head(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        group = RequestGroup(state.bridge, request.receive, "chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await stream_response(group, specs, ChatChunks(head, req.logprobs, include_usage, req.n))
        async with group:
            group.start(specs, stream=False)
            outputs = await group.results()
        return chat_response(head, outputs, req.n, req.logprobs)

    return router
