"""Every message that crosses a process boundary, typed, in one place (the codec that puts
them on the wire is ``protocol.codec``).

Client messages (``output``, ``status``, ``error``) follow the public client protocol of
docs/design.md ("Wire protocol") exactly; the requests a client sends are validated field by
field by the front end (``tokenizer_proc/validation.py``), with the codec's type checks.

(Over 400 lines on purpose: every message of every process boundary is here, so that the wire
protocol is read in one place; the data plane's frames are in ``protocol.dataplane``.)
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

# Re-exported: a process imports its messages and their codec from this one module.
from protocol.codec import PROTOCOL_VERSION, Message, ProtocolError, decode, encode, from_dict  # noqa: F401
from protocol.dataplane import KVLayout, TokenLogprob

# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class Role(StrEnum):
    """What an instance does. A ``StrEnum``: on the wire and in comparisons it is its value."""

    UNIFIED = "unified"
    PREFILL = "prefill"
    DECODE = "decode"


class FinishReason(StrEnum):
    """Why a request ended: a stop token or string, ``max_new_tokens``, or an abort."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)  # one per live request: no __dict__ for the garbage collector to walk
class SamplingParams:
    """Sampling parameters as the scheduler and worker see them (already validated).

    ``stop_token_ids`` already contains the model's EOS ids unless ``ignore_eos``.
    ``seed`` is always set: the front end mints one when the client gives none, so that a
    request's random stream never depends on which batch it lands in.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    return_logprob: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    top_logprobs: int = 0  # the k most likely tokens (and logprobs) returned per sampled token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalty(self) -> bool:
        """The worker keeps token counts for this request (engine.penalties)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class ModelInfo:
    """What an instance serves; reported by the worker, forwarded to the front end."""

    name: str
    architecture: str
    vocab_size: int
    context_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    eos_token_ids: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Client ⇄ front end (public protocol; no version field, see docs/design.md "Wire protocol")
# --------------------------------------------------------------------------------------------


@dataclass
class ClientOutput(Message):
    TYPE: ClassVar[str] = "output"
    INTERNAL: ClassVar[bool] = False
    rid: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    usage: dict[str, int] | None = None
    metrics: dict[str, float] | None = None
    top_logprobs: list[list[list[float]]] | None = None  # per token: [[token id (an int), logprob], ...]

    def to_dict(self) -> dict[str, Any]:
        # built by hand, not by the codec's encoder: one per streamed token, every field plain
        d = {"type": self.TYPE, "rid": self.rid, "text": self.text, "token_ids": self.token_ids,
             "finished": self.finished, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.usage is not None:
            d["usage"] = self.usage
        if self.metrics is not None:
            d["metrics"] = self.metrics
        if self.top_logprobs is not None:
            d["top_logprobs"] = self.top_logprobs
        return d


@dataclass
class ClientOutputs(Message):
    """Several ``output`` messages of one connection in one frame: the front end groups the
    outputs of one turn of its loop for the requests that asked with ``batch_outputs`` (one send
    per connection and turn instead of one per request; tokenizer_proc/outbox.py). Each entry
    is the map its ``output`` message would be, ``type`` included; a request's entries keep
    their order."""

    TYPE: ClassVar[str] = "outputs"
    INTERNAL: ClassVar[bool] = False
    outputs: list[ClientOutput]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "outputs": [out.to_dict() for out in self.outputs]}


# Error codes of the client protocol.
INVALID_REQUEST = "invalid_request"
QUEUE_FULL = "queue_full"
SHUTTING_DOWN = "shutting_down"
TRANSFER_FAILED = "transfer_failed"
PEER_UNAVAILABLE = "peer_unavailable"
INTERNAL = "internal"
ERROR_CODES = (INVALID_REQUEST, QUEUE_FULL, SHUTTING_DOWN, TRANSFER_FAILED, PEER_UNAVAILABLE, INTERNAL)


@dataclass
class ClientError(Message):
    TYPE: ClassVar[str] = "error"
    INTERNAL: ClassVar[bool] = False
    rid: str | None
    code: str
    message: str
    duplicate: bool | None = None  # true: refuses a request whose rid is live; that one goes on

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["duplicate"] is None:
            del d["duplicate"]
        return d


@dataclass
class InstanceStatus:
    name: str
    role: Role
    alive: bool
    ready: bool = False
    pending: int = 0
    prefilling: int = 0
    transferring: int = 0
    decoding: int = 0
    free_pages: int = 0
    cached_pages: int = 0
    total_pages: int = 0
    # disaggregated instances: each peer instance (input address) → its state on the control
    # plane ("registered", "connecting", "registering", "lost", "refused: <why>")
    peers: dict[str, str] = field(default_factory=dict)
    # disaggregated instances: each data-plane link of the worker (peer's KV address → state:
    # "registered", "connecting", "lost", "re_registering")
    links: dict[str, str] = field(default_factory=dict)


@dataclass
class ClientStatus(Message):
    TYPE: ClassVar[str] = "status"
    INTERNAL: ClassVar[bool] = False
    rid: str
    ready: bool
    instances: list[InstanceStatus]
    model: ModelInfo | None = None  # what the deployment serves (None until an instance reported)


@dataclass
class ClientMetrics(Message):
    """The answer to a client ``metrics`` request: the Prometheus text exposition of the front
    end's and every answering instance's metrics (docs/design.md, "Metrics")."""

    TYPE: ClassVar[str] = "metrics"
    INTERNAL: ClassVar[bool] = False
    rid: str
    text: str


# --------------------------------------------------------------------------------------------
# Front end → instance (scheduler)
# --------------------------------------------------------------------------------------------


@dataclass
class AttachFrontend(Message):
    """Sent by a front end to each instance at start-up and then every heartbeat interval, as
    its heartbeat: where the instance must send outputs, errors, status reports and heartbeats.
    ``rid_prefix`` is the prefix of the request ids it mints (``<prefix>-<n>``): when this front
    end falls silent the instance aborts those requests (and every request once none is left)."""

    TYPE: ClassVar[str] = "attach_frontend"
    output_addr: str
    rid_prefix: str = ""


@dataclass
class TokenizedRequest(Message):
    """A validated, tokenized generate request. ``rid`` is the front end's internal id,
    unique across all of its connections."""

    TYPE: ClassVar[str] = "tokenized_request"
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0  # time.time() at the front end
    room: int | None = None  # disaggregation: the pairing id, minted by the front end
    prefill_addr: str | None = None  # disaggregation, to the decode side: the prefill instance


@dataclass
class AbortRequest(Message):
    """Abort ``rid``: sent for client aborts, departed clients and stop strings found by the
    detokenizer. The instance frees the request and answers with a final output whose
    ``finish_reason`` is ``reason`` (the front end discards it when it already answered)."""

    TYPE: ClassVar[str] = "abort_request"
    rid: str
    reason: FinishReason = FinishReason.ABORT


@dataclass
class ConnectPrefill(Message):
    """Front end → decode instance at start-up (repeated until its heartbeat lists them): the
    prefill instances to register with. Registration results come back in ``Heartbeat.peers``."""

    TYPE: ClassVar[str] = "connect_prefill"
    prefill_addrs: list[str]


@dataclass
class StatusQuery(Message):
    TYPE: ClassVar[str] = "status_query"
    qid: int
    reply_to: str | None = None  # send the StatusReport there instead of to the front end
    metrics: bool = False  # the report also carries the instance's InstanceMetrics


# --------------------------------------------------------------------------------------------
# Instance (scheduler) → front end
# --------------------------------------------------------------------------------------------


@dataclass
class ReqOutput:
    """New tokens of one request in one step. The last one for a request has ``finished``."""

    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    queue_ms: float | None = None  # set once, on the first output
    top_token_ids: list[list[int]] | None = None  # per token, when the request asked for top_logprobs
    top_logprobs: list[list[float]] | None = None


@dataclass
class BatchOutput(Message):
    """One step's outputs. The common row, one more token of a request that goes on, travels
    as columns (no map per request on the wire, no object per request to build): request
    ``rids[i]`` got ``token_ids[i]``, and ``logprobs[i]`` when that column is sent (NaN for a
    request that did not ask). The rows that carry more (a request's first and last output, an
    abort, top logprobs) are ``outputs``. ``rows()`` reads both as ``ReqOutput``s."""

    TYPE: ClassVar[str] = "batch_output"
    outputs: list[ReqOutput] = field(default_factory=list)
    rids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.rids) or (
            self.logprobs is not None and len(self.logprobs) != len(self.rids)
        ):
            raise ProtocolError("batch_output: rids, token_ids and logprobs must have one entry per row",
                                self.TYPE)

    @classmethod
    def of_tokens(
        cls, rids: list[str], token_ids: list[int], finished: FinishReason | None = None
    ) -> BatchOutput:
        """One token per request, as columns; with ``finished``, as final rows of that reason."""
        if finished is None:
            return cls(rids=rids, token_ids=token_ids)
        pairs = zip(rids, token_ids, strict=True)
        outputs = [ReqOutput(rid, [t], finished=True, finish_reason=finished) for rid, t in pairs]
        return cls(outputs=outputs)

    def __len__(self) -> int:
        return len(self.outputs) + len(self.rids)

    def rows(self) -> list[ReqOutput]:
        """Every row as a ``ReqOutput`` (the column rows after the others)."""
        lps = self.logprobs if self.logprobs is not None else [None] * len(self.rids)
        columns = [
            ReqOutput(rid, [tok], None if lp is None or lp != lp else [lp])  # NaN: not asked for
            for rid, tok, lp in zip(self.rids, self.token_ids, lps, strict=True)
        ]
        return [*self.outputs, *columns]


@dataclass
class RequestFailed(Message):
    """The instance could not serve ``rid``; it holds nothing of it any more."""

    TYPE: ClassVar[str] = "request_failed"
    rid: str
    code: str
    message: str
    role: Role | None = None  # of the sending instance


@dataclass
class BucketHistogram:
    """A Prometheus histogram as plain numbers: ``counts[i]`` observations in (``bounds[i-1]``,
    ``bounds[i]``], the last one above every bound (+Inf); not cumulative (the exposition makes
    them so). ``observe`` is a bisect and two additions: cheap enough for a hot path."""

    bounds: list[float]  # increasing upper bounds, +Inf implied
    counts: list[int]  # len(bounds) + 1
    total: float = 0.0  # the sum of the observed values

    @classmethod
    def empty(cls, bounds: tuple[float, ...] | list[float]) -> BucketHistogram:
        return cls(list(bounds), [0] * (len(bounds) + 1))

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class InstanceMetrics:
    """An instance scheduler's Prometheus values (docs/design.md, "Metrics"), in its
    ``StatusReport`` when the query asks for them. Counters count since the instance started;
    the KV-transfer ones stay zero on a unified instance."""

    running: int  # requests holding a slot (or owed one)
    waiting: int  # requests queued and not yet admitted
    used_pages: int  # KV pages neither free nor evictable prefix cache
    total_pages: int
    prefix_cache_queries: int  # prompt tokens of the requests that ended after admission
    prefix_cache_hits: int  # of those, the tokens found in the prefix cache
    preemptions: int  # retractions (out of KV pages)
    queue_time: BucketHistogram  # seconds from arrival to first admission, per ended request
    kv_transfer_bytes: int = 0  # KV bytes of the rooms whose transfer succeeded
    kv_transfer_failures: int = 0  # rooms whose transfer failed (not those ended by an abort)
    kv_transfer_time: BucketHistogram | None = None  # seconds per successful room transfer


@dataclass
class StatusReport(Message):
    TYPE: ClassVar[str] = "status_report"
    qid: int
    status: InstanceStatus
    metrics: InstanceMetrics | None = None  # when the query asked for them


@dataclass
class Heartbeat(Message):
    """Periodic liveness and load report of an instance to each attached front end."""

    TYPE: ClassVar[str] = "heartbeat"
    name: str
    role: Role
    ready: bool
    input_addr: str
    model: ModelInfo | None = None
    queued_tokens: int = 0
    running: int = 0
    # decode instances: prefill input address → "registered" | "connecting" | "refused: <why>"
    peers: dict[str, str] = field(default_factory=dict)
    incarnation: str = ""  # random per scheduler process: a new one at the same address is a restart


# --------------------------------------------------------------------------------------------
# Scheduler ⇄ worker (per-step deltas; see docs/design.md "Scheduler ⇄ worker")
# --------------------------------------------------------------------------------------------


@dataclass
class NewReq:
    """A request that takes a worker slot; its page table row starts empty. ``next_token``
    (disaggregation, decode side) seeds the slot's future-token map with the first token that
    the prefill instance sampled, so the slot decodes from its first step here."""

    slot: int
    sampling: SamplingParams
    next_token: int | None = None
    # the request's history, sent only when it asks for a penalty (the worker counts tokens)
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


@dataclass
class PageAppend:
    """Pages appended to the end of ``slot``'s page table row (prefix-cache pages included)."""

    slot: int
    pages: list[int]


@dataclass
class ExtendReq:
    """Run ``token_ids`` at positions ``start_pos..`` of ``slot``; positions below
    ``start_pos`` are already in the KV cache. ``sample`` is False for a non-final chunk."""

    slot: int
    start_pos: int
    token_ids: list[int]
    sample: bool = True


@dataclass
class KVSend:
    """Prefill worker, after this step's forward: send the KV of ``src_pages`` (this worker's)
    into ``dst_pages`` (the decode worker's) for ``room``. ``first`` opens the room on the data
    plane; ``last`` also carries the token this step sampled for ``slot`` (the first token)."""

    room: int
    slot: int
    src_pages: list[int]
    dst_pages: list[int]
    first: bool = False
    last: bool = False
    decode_tp_size: int = 1  # the decode instance's ranks: over nixl each writes to those holding its heads


@dataclass
class KVExpect:
    """Decode worker, before this step: ``room``'s KV will arrive from the prefill worker whose
    KV sender is at ``peer`` (a registered transfer address) into ``dst_pages``."""

    room: int
    peer: str
    dst_pages: list[int]


@dataclass
class StepBatch(Message):
    """One forward step. Applied in this order: ``released`` slots, ``new_reqs``,
    ``page_appends``, then the forward over ``extends`` followed by decodes.

    A decode's input token is the token the worker itself sampled last for that slot (the
    future-token map), so the scheduler never waits for it; ``decode_positions[i]`` is the
    position of that input token in ``decode_slots[i]``'s sequence.
    """

    TYPE: ClassVar[str] = "step_batch"
    step_id: int
    released: list[int] = field(default_factory=list)
    new_reqs: list[NewReq] = field(default_factory=list)
    page_appends: list[PageAppend] = field(default_factory=list)
    extends: list[ExtendReq] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    # Disaggregation (data-plane deltas, applied in step order): rooms to abort and rooms to
    # expect before the forward, pages to send after it. Each room ends in one TransferResult.
    abort_rooms: list[int] = field(default_factory=list)
    expects: list[KVExpect] = field(default_factory=list)
    transfers: list[KVSend] = field(default_factory=list)


@dataclass
class StepResult(Message):
    """Sampled tokens of one step, one per sampling row: the extends with ``sample`` in batch
    order, then every decode slot."""

    TYPE: ClassVar[str] = "step_result"
    step_id: int
    slots: list[int]
    token_ids: list[int]
    logprobs: list[float] | None = None
    forward_ms: float = 0.0
    # per row, the k most likely tokens of rows whose request asked for top_logprobs ([] otherwise)
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


@dataclass
class TransferEndpoint:
    """A disaggregated worker's end of the KV data plane: the layout of its KV pool (what a peer
    must match, the backend included), and for a prefill worker the address its KV sender is
    bound to (decode workers connect there); where every tensor-parallel rank moves its own KV
    heads, each rank's sender's address (decode rank r registers with prefill rank r)."""

    layout: KVLayout
    address: str = ""
    rank_addresses: list[str] = field(default_factory=list)  # each rank's sender, when each sends its own

    @property
    def backend(self) -> str:
        return self.layout.backend


@dataclass
class WorkerReady(Message):
    """The worker has loaded its model, sized its KV pool and warmed up (compiled kernels,
    captured graphs). Page 0 is reserved as the padding page: usable pages are 1..num_pages-1."""

    TYPE: ClassVar[str] = "worker_ready"
    model: ModelInfo
    num_pages: int
    page_size: int
    max_slots: int
    max_context_len: int
    device: str
    transfer: TransferEndpoint | None = None  # prefill and decode workers


@dataclass
class WorkerFailed(Message):
    """The worker hit an unrecoverable error (start-up or a step); ``code`` is what its requests
    fail with (``peer_unavailable`` when another tensor-parallel rank of the instance is gone)."""

    TYPE: ClassVar[str] = "worker_failed"
    message: str
    code: str = INTERNAL


@dataclass
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass
class RegisterKVPeer(Message):
    """Decode scheduler → its worker: register the KV receiver with the prefill worker whose KV
    sender is at ``transfer_addr`` (the prefill instance ``prefill_addr``); answered by
    ``KVPeerRegistered``."""

    TYPE: ClassVar[str] = "register_kv_peer"
    prefill_addr: str
    transfer_addr: str
    rank_addresses: list[str] = field(default_factory=list)  # the prefill ranks' senders, by rank


@dataclass
class KVPeerRegistered(Message):
    TYPE: ClassVar[str] = "kv_peer_registered"
    prefill_addr: str
    ok: bool
    error: str = ""


@dataclass
class KVLinkStates(Message):
    """Worker → its scheduler, whenever they change: the state of each data-plane link of the
    worker's KV sender or receiver (peer's KV address → ``kvtransfer.LinkState`` value), for
    ``status``."""

    TYPE: ClassVar[str] = "kv_link_states"
    links: dict[str, str]


@dataclass
class TransferResult(Message):
    """Prefill or decode worker → its scheduler, once per room it opened: the room's pages are
    the scheduler's again. Prefill side: ``ok`` means the decode side acknowledged every page.
    Decode side: ``ok`` means every destination page is written; ``first_token`` is set, and
    ``first_logprob`` too when the prefill worker computed logprobs in that step."""

    TYPE: ClassVar[str] = "transfer_result"
    room: int
    ok: bool
    first_token: int | None = None
    error: str = ""
    first_logprob: TokenLogprob | None = None


@dataclass
class RoomPart(Message):
    """A rank of a tensor-parallel instance whose ranks move their own KV heads (a pool-to-pool
    backend) → its rank 0: the final result of its part of a room (its side's, or its refusal);
    rank 0 reports the room once every rank's part is in (``kvtransfer.tp_parts``)."""

    TYPE: ClassVar[str] = "kv_room_part"
    rank: int
    result: TransferResult


@dataclass
class RegistrationPart(Message):
    """Such a decode rank → its rank 0: its receiver's registration with its prefill rank, for
    the ``attempt``-th ``RegisterKVPeer`` naming that prefill instance."""

    TYPE: ClassVar[str] = "kv_registration_part"
    rank: int
    attempt: int
    outcome: KVPeerRegistered


@dataclass
class LinkStatesPart(Message):
    """Such a rank → its rank 0, whenever they change: its own data-plane links (rank 0 reports
    every rank's, the others' named ``rank R: peer``)."""

    TYPE: ClassVar[str] = "kv_link_states_part"
    rank: int
    states: KVLinkStates


# --------------------------------------------------------------------------------------------
# Decode instance ⇄ prefill instance (control plane; scheduler to scheduler, input addresses)
# --------------------------------------------------------------------------------------------


@dataclass
class PeerInfo:
    """An instance's side of the registration: its name and input address, and its worker's end
    of the data plane, whose ``KVLayout`` the other side checks against its own (one layout, one
    check: ``KVLayout.mismatch``); a mismatch is refused with a message naming the field."""

    name: str
    input_addr: str
    transfer: TransferEndpoint
    incarnation: str = ""  # random per scheduler process: a peer registering with a new one restarted


@dataclass
class RegisterDecode(Message):
    """Decode → prefill instance, once per pair (repeated until answered)."""

    TYPE: ClassVar[str] = "register_decode"
    info: PeerInfo


@dataclass
class RegisterReply(Message):
    """Prefill → decode instance: registration accepted (``info`` is the prefill side's, with
    its KV sender's address) or refused (``error`` names the mismatching field)."""

    TYPE: ClassVar[str] = "register_reply"
    prefill_addr: str
    ok: bool
    error: str = ""
    info: PeerInfo | None = None


@dataclass
class PeerHeartbeat(Message):
    """Between registered prefill and decode instances; ``addr`` is the sender's input address."""

    TYPE: ClassVar[str] = "peer_heartbeat"
    addr: str


@dataclass
class PeerUnknown(Message):
    """Prefill → decode instance, in answer to a heartbeat: ``addr`` (the prefill instance) does
    not have this decode instance registered (it was dropped after a silence): register again."""

    TYPE: ClassVar[str] = "peer_unknown"
    addr: str


@dataclass
class RoomDest(Message):
    """Decode → prefill instance: ``room``'s KV goes into ``dst_pages``, one per page of the
    prompt after its first ``cached_tokens`` (page-aligned), which the decode side already holds."""

    TYPE: ClassVar[str] = "room_dest"
    room: int
    rid: str
    decode_addr: str
    dst_pages: list[int]
    cached_tokens: int = 0


@dataclass
class RoomAbort(Message):
    """Either instance → the other: ``room`` (request ``rid``) ended here without a transfer
    (abort, failure, refusal); the other side ends it too, with ``code`` and ``message``."""

    TYPE: ClassVar[str] = "room_abort"
    room: int
    rid: str
    addr: str  # the sender's input address
    code: str
    message: str
