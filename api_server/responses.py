"""OpenAI response objects and server-sent-event chunks, built from the front end's outputs.

Token strings: the front end returns token ids and text, not each token's text, so logprob
entries name their token as ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids`` form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from api_server.generation import Output

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def token_name(token_id: int) -> str:
    return f"token_id:{token_id}"


def usage(outputs: list[Output], n: int) -> dict[str, Any]:
    """Usage of ``n`` samples per prompt (outputs prompt-major): each prompt counts once, with
    the most of its tokens any of its samples found cached."""
    prompt = cached = 0
    for start in range(0, len(outputs), n):
        samples = outputs[start:start + n]
        prompt += samples[0].usage.get("prompt_tokens", 0)
        cached += max(s.usage.get("cached_tokens", 0) for s in samples)
    completion = sum(o.usage.get("completion_tokens", 0) for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


TopLogprobs = list[list[list[float]]]  # the front end's: per token, its [token id, logprob] pairs


def completion_logprobs(
    token_ids: list[int], logprobs: list[float], top: TopLogprobs | None = None
) -> dict[str, Any]:
    """OpenAI's completion ``logprobs``; ``top`` (when asked): per token a map token → logprob."""
    top_maps = [{token_name(int(t)): lp for t, lp in pairs} for pairs in top] if top else None
    return {
        "tokens": [token_name(t) for t in token_ids],
        "token_logprobs": logprobs,
        "top_logprobs": top_maps,
        "text_offset": None,
    }


def chat_logprobs(
    token_ids: list[int], logprobs: list[float], top: TopLogprobs | None = None
) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``; each entry's ``top_logprobs`` from ``top`` when asked."""
    tops = top or [[] for _ in token_ids]
    content = [
        {"token": token_name(t), "logprob": lp, "bytes": None, "top_logprobs": _chat_top(pairs)}
        for t, lp, pairs in zip(token_ids, logprobs, tops, strict=True)
    ]
    return {"content": content, "refusal": None}


def _chat_top(pairs: list[list[float]]) -> list[dict[str, Any]]:
    return [{"token": token_name(int(t)), "logprob": lp, "bytes": None} for t, lp in pairs]


@dataclass(frozen=True)
class Head:
    """What every object of one response carries."""

    id: str
    created: int
    model: str

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def completion_response(
    head: Head, outputs: list[Output], n: int, echo: list[str] | None, logprobs: bool
) -> dict[str, Any]:
    """A ``text_completion``; ``echo``: the prompt texts to put before each answer."""
    choices = []
    for i, out in enumerate(outputs):
        prefix = echo[i // n] if echo else ""
        choices.append({
            "index": i,
            "text": prefix + out.text,
            "logprobs": (
                completion_logprobs(out.token_ids, out.logprobs, out.top_logprobs) if logprobs else None
            ),
            "finish_reason": out.finish_reason,
        })
    return {**head.fields("text_completion"), "choices": choices, "usage": usage(outputs, n)}


def chat_response(head: Head, outputs: list[Output], n: int, logprobs: bool) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": out.text, "refusal": None},
            "logprobs": chat_logprobs(out.token_ids, out.logprobs, out.top_logprobs) if logprobs else None,
            "finish_reason": out.finish_reason,
        }
        for i, out in enumerate(outputs)
    ]
    return {**head.fields("chat.completion"), "choices": choices, "usage": usage(outputs, n)}


@dataclass
class CompletionChunks:
    """The ``text_completion`` chunks of a streamed completion."""

    head: Head
    logprobs: bool
    include_usage: bool
    echo: list[str] | None = None
    n: int = 1
    _echoed: set[int] = field(default_factory=set, init=False)

    def opening(self, count: int) -> list[dict[str, Any]]:
        return []

    def chunks(self, index: int, msg: dict[str, Any]) -> list[dict[str, Any]]:
        text = msg.get("text") or ""
        if self.echo and index not in self._echoed:
            self._echoed.add(index)
            text = self.echo[index // self.n] + text
        ids = msg.get("token_ids") or []
        if not text and not ids and not msg.get("finished"):
            return []
        choice = {
            "index": index,
            "text": text,
            "logprobs": (
                completion_logprobs(ids, msg.get("logprobs") or [], msg.get("top_logprobs"))
                if self.logprobs else None
            ),
            "finish_reason": msg.get("finish_reason") if msg.get("finished") else None,
        }
        return [self._chunk([choice])]

    def closing(self, outputs: list[Output]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.head.fields("text_completion"), "choices": [], "usage": usage(outputs, self.n)}]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self.head.fields("text_completion"), "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk


@dataclass
class ChatChunks:
    """The ``chat.completion.chunk`` chunks of a streamed chat completion: per choice a first
    chunk with the role, content chunks, and a last one with the finish reason."""

    head: Head
    logprobs: bool
    include_usage: bool
    n: int = 1

    def opening(self, count: int) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(count)]

    def chunks(self, index: int, msg: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        text, ids = msg.get("text") or "", msg.get("token_ids") or []
        if text or (self.logprobs and ids):
            lps = None
            if self.logprobs:
                lps = chat_logprobs(ids, msg.get("logprobs") or [], msg.get("top_logprobs"))
            out.append(self._chunk(index, {"content": text}, lps))
        if msg.get("finished"):
            out.append(self._chunk(index, {}, finish_reason=msg.get("finish_reason")))
        return out

    def closing(self, outputs: list[Output]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.head.fields("chat.completion.chunk"), "choices": [], "usage": usage(outputs, self.n)}]

    def _chunk(
        self, index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self.head.fields("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk
