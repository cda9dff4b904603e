"""A request's lifecycle inside one instance, with checked transitions.

``pending → prefilling → (transferring) → decoding → finished``; ``aborted`` and ``failed`` are
reachable from every live state. Retraction (out of KV memory) sends a prefilling or decoding
request back to ``pending``. An illegal transition is a bug and raises.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from protocol.messages import SamplingParams, TokenizedRequest
from scheduler_proc.resources import ReqResources

logger = logging.getLogger(__name__)


class ReqState(enum.Enum):
    PENDING = "pending"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


_TERMINAL = frozenset({ReqState.FINISHED, ReqState.ABORTED, ReqState.FAILED})
_ENDS = frozenset({ReqState.ABORTED, ReqState.FAILED})  # reachable from every live state
_ALLOWED: dict[ReqState, frozenset[ReqState]] = {
    ReqState.PENDING: _ENDS | {ReqState.PREFILLING, ReqState.TRANSFERRING},  # → transferring: decode side
    ReqState.PREFILLING: _ENDS | {ReqState.TRANSFERRING, ReqState.DECODING, ReqState.PENDING},
    ReqState.TRANSFERRING: _ENDS | {ReqState.DECODING, ReqState.FINISHED},  # → finished: prefill side
    ReqState.DECODING: _ENDS | {ReqState.FINISHED, ReqState.PENDING},
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class Request:
    """One request's tokens, progress and resources.

    Positions are absolute in ``prompt + output_ids``. ``kv_len`` counts the positions whose KV
    is computed or scheduled in a step already sent; ``scheduled_outputs`` counts the output
    tokens that will exist once every sent step has been answered (so max_new_tokens is never
    overrun under overlap). ``epoch`` changes on retraction so that a result row of an older
    incarnation is recognised and discarded; ``inflight`` counts sent steps not yet answered
    that contain this request.
    """

    rid: str
    prompt: list[int]
    sampling: SamplingParams
    priority: int
    arrival_time: float
    seq: int  # arrival order at this instance, the tie-breaker of every policy
    state: ReqState = ReqState.PENDING
    output_ids: list[int] = field(default_factory=list)
    res: ReqResources = field(default_factory=ReqResources)
    kv_len: int = 0
    scheduled_outputs: int = 0
    epoch: int = 0
    inflight: int = 0
    cached_tokens: int | None = None  # prefix-cache hit at first admission
    first_scheduled_time: float | None = None
    sent_first_output: bool = False
    stop_ids: frozenset[int] = frozenset()
    room: int | None = None  # disaggregation: the pairing id minted by the front end
    priority_order: tuple[int, int] = field(init=False)  # sort key of the priority policy

    def __post_init__(self) -> None:
        self.priority_order = (-self.priority, self.seq)

    @classmethod
    def from_message(cls, msg: TokenizedRequest, seq: int) -> Request:
        return cls(
            rid=msg.rid,
            prompt=list(msg.input_ids),
            sampling=msg.sampling,
            priority=msg.priority,
            arrival_time=msg.arrival_time or time.time(),
            seq=seq,
            stop_ids=frozenset(msg.sampling.stop_token_ids),
            room=msg.room,
        )

    @property
    def live(self) -> bool:
        return self.state not in _TERMINAL

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output_ids)

    @property
    def remaining_new_tokens(self) -> int:
        """Output tokens still to schedule."""
        return self.sampling.max_new_tokens - self.scheduled_outputs

    def kv_tokens(self) -> list[int]:
        """The known tokens whose KV is computed or scheduled: what may enter the prefix cache."""
        return self.tokens[: min(self.kv_len, self.num_tokens)]

    def transition(self, to: ReqState) -> None:
        if to not in _ALLOWED.get(self.state, ()):
            raise IllegalTransition(f"rid={self.rid}: {self.state.value} → {to.value}")
        logger.debug("rid=%s %s → %s", self.rid, self.state.value, to.value)
        self.state = to

    def finish_reason(self, token: int) -> str | None:
        """Why the request ends after emitting ``token`` (already appended), if it does."""
        if token in self.stop_ids:
            return "stop"
        if len(self.output_ids) >= self.sampling.max_new_tokens:
            return "length"
        return None
