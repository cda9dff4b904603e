"""Server-sent events of a request group: the chunks a formatter makes of each front-end output,
an error object if the front end fails mid-stream, and ``data: [DONE]``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from api_server.backend import FrontendError
from api_server.errors import from_frontend
from api_server.generation import ClientGone, GenerateSpec, Output, RequestGroup
from api_server.responses import DONE, sse

Chunk = dict[str, Any]


class ChunkFormatter(Protocol):
    def opening(self, count: int) -> list[Chunk]: ...
    def chunks(self, index: int, msg: dict[str, Any]) -> list[Chunk]: ...
    def closing(self, outputs: list[Output]) -> list[Chunk]: ...


async def stream_response(
    group: RequestGroup, specs: list[GenerateSpec], formatter: ChunkFormatter
) -> StreamingResponse:
    """Start ``specs`` streaming and answer with their events. Until every request has sent its
    first message, errors are still HTTP errors (raised here); the group closes either way."""
    group.start(specs, stream=True)
    try:
        await group.prime()
    except BaseException:
        group.close()
        raise
    return StreamingResponse(
        _events(group, formatter, len(specs)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(group: RequestGroup, formatter: ChunkFormatter, count: int) -> AsyncIterator[bytes]:
    outputs = [Output() for _ in range(count)]
    try:
        for chunk in formatter.opening(count):
            yield sse(chunk)
        async for index, msg in group.events():
            outputs[index].add(msg)
            for chunk in formatter.chunks(index, msg):
                yield sse(chunk)
        for chunk in formatter.closing(outputs):
            yield sse(chunk)
    except FrontendError as e:
        yield sse(from_frontend(e.code, e.message).body())
    except ClientGone:
        return
    finally:
        group.close()
    yield DONE
