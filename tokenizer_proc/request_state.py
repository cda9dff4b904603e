"""The front end's view of a live request: where it runs, its text so far, its timings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from protocol.messages import ClientOutput, FinishReason, ReqOutput
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.instances import Instance
from tokenizer_proc.topology import Route

ClientKey = tuple[bytes, str]  # (connection identity, client rid)


@dataclass(eq=False)
class LiveRequest:
    conn: bytes
    client_rid: str
    rid: str  # internal id, unique across connections
    route: Route
    stream: bool
    return_logprob: bool
    detok: IncrementalDetokenizer
    prompt_tokens: int
    arrival: float  # time.perf_counter() when the front end received it
    first_token_at: float | None = None
    last_token_at: float | None = None  # when its latest output with tokens came (metrics)
    queue_ms: float = 0.0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    aborted_by_client: bool = False  # an abort is on its way to the instances
    batch_outputs: bool = False  # its outputs may share an ``outputs`` frame with others of ``conn``
    # Non-streaming requests collect their whole answer here.
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)

    @property
    def key(self) -> ClientKey:
        return (self.conn, self.client_rid)

    @property
    def streaming(self) -> bool:
        """An instance has sent outputs of it (the decode side, when disaggregated)."""
        return self.first_token_at is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, out: ReqOutput, now: float) -> ClientOutput | None:
        """Take one instance output; return the message for the client, if one is due.

        A stop string found by the detokenizer finishes the request with reason ``stop``
        even when the instance has not finished it (the caller then aborts it there).
        """
        self._record(out, now)
        text = self.detok.step(out.token_ids)
        if self.detok.stopped:
            self.finish_reason = FinishReason.STOP
        elif out.finished:
            text += self.detok.finish()
            self.finish_reason = out.finish_reason or FinishReason.STOP
        logprobs = (out.logprobs or []) if self.return_logprob else None
        top = top_logprob_pairs(out)
        if self.stream:
            if not (out.token_ids or self.finished):
                return None
            return self._message(text, list(out.token_ids), logprobs, now, top)
        self.texts.append(text)
        self.token_ids += out.token_ids
        if logprobs is not None:
            self.logprobs += logprobs
        self.top_logprobs += top or []
        if not self.finished:
            return None
        return self._message(
            "".join(self.texts), self.token_ids, self.logprobs if self.return_logprob else None, now,
            self.top_logprobs or None,
        )

    def apply_token(self, token: int, logprob: float | None, now: float) -> ClientOutput | None:
        """``apply`` of a column row of ``BatchOutput``: one more token of a request that the
        instance goes on with (no finish, counts or top logprobs come with it), without a
        ``ReqOutput`` to build. The same state and message as ``apply`` of that row."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += 1
        text = self.detok.step((token,))
        if self.detok.stopped:
            self.finish_reason = FinishReason.STOP
        logprobs = ([] if logprob is None else [logprob]) if self.return_logprob else None
        if self.stream:
            if self.finish_reason is None:  # the common case: no usage or metrics to add
                return ClientOutput(self.client_rid, text, [token], False, None, logprobs)
            return self._message(text, [token], logprobs, now)
        self.texts.append(text)
        self.token_ids.append(token)
        if logprobs is not None:
            self.logprobs += logprobs
        if not self.finished:
            return None
        return self._message(
            "".join(self.texts), self.token_ids, self.logprobs if self.return_logprob else None, now,
            self.top_logprobs or None,
        )

    def abort(self, now: float) -> ClientOutput:
        """Finish with reason ``abort`` here (the client asked for it; the instance failed the
        request before the abort reached it): the client's final message."""
        aborted = ReqOutput(rid=self.rid, token_ids=[], finished=True, finish_reason=FinishReason.ABORT)
        final = self.apply(aborted, now)
        assert final is not None
        return final

    def _record(self, out: ReqOutput, now: float) -> None:
        if self.first_token_at is None and (out.token_ids or out.finished):
            self.first_token_at = now
        if out.token_ids:
            self.last_token_at = now
        if out.queue_ms is not None:
            self.queue_ms = out.queue_ms
        if out.prompt_tokens:
            self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        self.completion_tokens += len(out.token_ids)

    def _message(
        self, text: str, token_ids: list[int], logprobs: list[float] | None, now: float,
        top_logprobs: list[list[list[float]]] | None = None,
    ) -> ClientOutput:
        msg = ClientOutput(
            rid=self.client_rid,
            text=text,
            token_ids=token_ids,
            finished=self.finished,
            finish_reason=self.finish_reason,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        if self.finished:
            msg.usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
            }
            first = self.first_token_at if self.first_token_at is not None else now
            msg.metrics = {
                "queue_ms": round(self.queue_ms, 3),
                "ttft_ms": round((first - self.arrival) * 1e3, 3),
                "latency_ms": round((now - self.arrival) * 1e3, 3),
            }
        return msg


def top_logprob_pairs(out: ReqOutput) -> list[list[list[float]]] | None:
    """The client's ``top_logprobs`` of ``out``: per token, its [token id, logprob] pairs."""
    if out.top_token_ids is None or out.top_logprobs is None:
        return None
    return [
        [[token_id, logprob] for token_id, logprob in zip(ids, lps, strict=True)]
        for ids, lps in zip(out.top_token_ids, out.top_logprobs, strict=True)
    ]


class RequestTable:
    """Live requests, by internal rid and by (connection, client rid)."""

    def __init__(self) -> None:
        self._by_rid: dict[str, LiveRequest] = {}
        self._by_key: dict[ClientKey, LiveRequest] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def __iter__(self) -> Iterator[LiveRequest]:
        return iter(self._by_rid.values())

    def add(self, req: LiveRequest) -> None:
        self._by_rid[req.rid] = req
        self._by_key[req.key] = req

    def remove(self, req: LiveRequest) -> None:
        self._by_rid.pop(req.rid, None)
        self._by_key.pop(req.key, None)

    def get(self, rid: str) -> LiveRequest | None:
        return self._by_rid.get(rid)

    def find(self, conn: bytes, client_rid: str) -> LiveRequest | None:
        return self._by_key.get((conn, client_rid))

    def of_conn(self, conn: bytes) -> list[LiveRequest]:
        return [req for req in self._by_rid.values() if req.conn == conn]

    def involving(self, inst: Instance) -> list[LiveRequest]:
        return [req for req in self._by_rid.values() if req.route.involves(inst, req.streaming)]
