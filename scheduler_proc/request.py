"""A request's lifecycle inside one instance, with checked transitions.

``pending → prefilling → (transferring) → decoding → finished``; ``aborted`` and ``failed`` are
reachable from every live state. Retraction (out of KV memory) sends a prefilling or decoding
request back to ``pending``. An illegal transition is a bug and raises.
"""

from __future__ import annotations

import enum
import logging
import time
from array import array
from dataclasses import dataclass, field

from protocol.messages import SamplingParams, TokenizedRequest
from scheduler_proc.radix_cache import token_array
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


_STOP_SETS: dict[tuple[int, ...], frozenset[int]] = {}
_MAX_STOP_SETS = 1024


def _stop_set(ids: list[int]) -> frozenset[int]:
    """One shared frozenset per distinct stop-id list (nearly every request has the model's EOS
    ids): one object fewer per request for the garbage collector to walk."""
    key = tuple(ids)
    found = _STOP_SETS.get(key)
    if found is None:
        if len(_STOP_SETS) >= _MAX_STOP_SETS:
            _STOP_SETS.clear()
        found = _STOP_SETS[key] = frozenset(key)
    return found


@dataclass(eq=False, slots=True)
class Request:
    """One request's tokens, progress and resources.

    Positions are absolute in ``prompt + output_ids``. ``kv_len`` counts the positions whose KV
    is computed or scheduled in a step already sent; ``scheduled_outputs`` counts the output
    tokens that will exist once every sent step has been answered (so max_new_tokens is never
    overrun under overlap). ``epoch`` changes on retraction so that a result row of an older
    incarnation is recognised and discarded; ``inflight`` counts sent steps not yet answered
    that contain this request. Token ids are compact arrays (``token_array``), which the
    garbage collector does not walk; ``__slots__`` spare it a ``__dict__`` to walk per request.
    ``budget_member`` and ``budget_share`` are its entry in the core's ``RunningBudget``.
    """

    rid: str
    prompt: array
    sampling: SamplingParams
    priority: int
    arrival_time: float
    seq: int  # arrival order at this instance, the tie-breaker of every policy
    state: ReqState = ReqState.PENDING
    output_ids: array = field(default_factory=lambda: token_array(()))
    res: ReqResources = field(default_factory=ReqResources)
    kv_len: int = 0
    scheduled_outputs: int = 0
    epoch: int = 0
    inflight: int = 0
    cached_tokens: int | None = None  # prefix-cache hit at first admission
    first_scheduled_time: float | None = None
    sent_first_output: bool = False
    plain_until: int = 0  # output tokens below which a new token goes out as a plain column entry
    stop_ids: frozenset[int] = frozenset()
    room: int | None = None  # disaggregation: the pairing id minted by the front end
    priority_order: tuple[int, int] = field(init=False)  # sort key of the priority policy
    budget_member: bool = False  # counted in the running batch's pages to finish (admission.py)
    budget_share: tuple[int, int] = (0, 0)  # its (input, decode) pages as counted there

    def __post_init__(self) -> None:
        self.priority_order = (-self.priority, self.seq)

    @classmethod
    def from_message(cls, msg: TokenizedRequest, seq: int) -> Request:
        return cls(
            rid=msg.rid,
            prompt=token_array(msg.input_ids),
            sampling=msg.sampling,
            priority=msg.priority,
            arrival_time=msg.arrival_time or time.time(),
            seq=seq,
            stop_ids=_stop_set(msg.sampling.stop_token_ids),
            room=msg.room,
        )

    @property
    def live(self) -> bool:
        return self.state not in _TERMINAL

    @property
    def tokens(self) -> array:
        return self.prompt + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output_ids)

    @property
    def remaining_new_tokens(self) -> int:
        """Output tokens still to schedule."""
        return self.sampling.max_new_tokens - self.scheduled_outputs

    def kv_tokens(self) -> array:
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
