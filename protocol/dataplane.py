"""The frames of the KV data plane, between a prefill worker's KV sender and a decode worker's KV
receiver (``kvtransfer``), and the ``KVLayout`` both sides must agree on.

Each frame is a typed message of ``protocol.codec`` (its own ``kv_…`` type tag, the protocol
version ``v``); a ``KVChunk`` header is followed by the chunk's raw payload frames on the zmq
backend. Which side sends which frame, and when, is described in ``docs/design.md`` (the KV
data plane); ``kvtransfer/link.py`` is the one place that puts them on a socket.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol.codec import PROTOCOL_VERSION, Message

# Backends whose tensor-parallel instances move their KV through rank 0, which maps any two
# ``--tp-size``s onto each other (``kvtransfer.tp_hub``); the others move pool to pool, each
# rank its own heads (``kvtransfer.tp_parts``).
TP_HUB_BACKENDS = ("zmq", "fake")
# Pool-to-pool backends that write a head slice of each token slot, so that any two sizes map
# there too (``kvtransfer.tp_slices``); the other pool-to-pool ones (cuda_ipc) need equal sizes.
TP_SLICING_BACKENDS = ("nixl",)
TP_MAPPING_BACKENDS = TP_HUB_BACKENDS + TP_SLICING_BACKENDS
# The rooms a front end mints are below ``1 << ROOM_ID_BITS``; on the data plane the bits above
# tell the parts of a room apart where one rank moves it to or from several (``tp_slices``).
ROOM_ID_BITS = 56


def deal(items: int, ranks: int, rank: int) -> tuple[int, int]:
    """``rank``'s share of ``items`` dealt out whole over ``ranks`` (the first ``items % ranks``
    ranks take one more): (first item, count)."""
    base, extra = divmod(items, ranks)
    return rank * base + min(rank, extra), base + (rank < extra)


MAX_TP_SIZE = 128  # ranks of one instance a peer may claim


def split_problem(num_kv_heads: int, tp_size: int) -> str | None:
    """Why ``tp_size`` ranks cannot hold ``num_kv_heads`` KV heads as every instance splits them
    (``kv_head_range``), or None: a peer's claimed size is checked before anything is sized by it."""
    if not 1 <= tp_size <= MAX_TP_SIZE:
        return f"tp_size {tp_size} is not between 1 and {MAX_TP_SIZE}"
    if num_kv_heads < 1 or (num_kv_heads < tp_size and tp_size % num_kv_heads):
        return f"{tp_size} ranks cannot split {num_kv_heads} KV heads"
    return None


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads rank ``tp_rank`` of ``tp_size`` holds: (first head, count). Dealt out whole
    where there are at least as many heads as ranks; else each head is replicated on
    ``tp_size // num_kv_heads`` consecutive ranks. Both instances of a pair compute the other's."""
    if num_kv_heads >= tp_size:
        return deal(num_kv_heads, tp_size, tp_rank)
    return tp_rank // (tp_size // num_kv_heads), 1


@dataclass(frozen=True)
class KVLayout:
    """What a prefill and a decode worker must agree on, checked once per registration. It is
    the instance's: ``num_kv_heads`` counts the KV heads of all its tensor-parallel ranks
    together (the model's), ``tp_size`` how many ranks hold them, ``tp_rank`` the rank whose
    data-plane end this is (0 where rank 0 moves the whole instance's KV; each rank's own where
    every rank moves its heads)."""

    model: str
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    backend: str
    tp_size: int = 1
    tp_rank: int = 0
    protocol_version: int = PROTOCOL_VERSION

    def mismatched_field(self, theirs: KVLayout) -> str | None:
        """The first field on which ``theirs`` differs from this layout (the protocol version
        first: with another version the other fields may mean something else), or None. Over a
        backend of ``TP_MAPPING_BACKENDS`` the two ``tp_size``s may differ: those map; over one of
        ``TP_SLICING_BACKENDS`` any rank may pair with any (which heads it sends where is
        ``kvtransfer.tp_slices``'s to say)."""
        others = (f.name for f in dataclasses.fields(self) if f.name != "protocol_version")
        names = ["protocol_version", *others]
        if self.backend in TP_MAPPING_BACKENDS and self.backend == theirs.backend:
            names.remove("tp_size")
        if self.backend in TP_SLICING_BACKENDS and self.backend == theirs.backend:
            names.remove("tp_rank")
        differs = next((n for n in names if getattr(self, n) != getattr(theirs, n)), None)
        if differs is None and split_problem(theirs.num_kv_heads, theirs.tp_size) is not None:
            return "tp_size"
        if differs is None and not 0 <= theirs.tp_rank < theirs.tp_size:
            return "tp_rank"
        return differs

    def mismatch(
        self, theirs: KVLayout, ours_label: str = "this side", theirs_label: str = "the peer"
    ) -> str | None:
        """Why ``theirs`` does not match this layout (naming the field and both values), or None.
        The one check of a pairing, for the schedulers' registration and the data plane's alike."""
        name = self.mismatched_field(theirs)
        if name is None:
            return None
        if name == "tp_size" and (problem := split_problem(theirs.num_kv_heads, theirs.tp_size)):
            return f"tp_size mismatch: {theirs_label} claims an impossible split: {problem}"
        return describe_mismatch(name, getattr(self, name), getattr(theirs, name), ours_label, theirs_label)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)
        return per_token * self.page_size


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype name (``bfloat16`` → 2, ``float8_e4m3fn`` → 1), read
    from its bit width: the schedulers, which use it too, never import torch."""
    bits = re.search(r"\d+", dtype)
    if bits is None:
        raise ValueError(f"dtype {dtype!r} names no bit width")
    return max(int(bits.group()) // 8, 1)


def describe_mismatch(field_name: str, ours: Any, theirs: Any, ours_label: str, theirs_label: str) -> str:
    """The one wording of a layout mismatch."""
    return f"{field_name} mismatch: {ours_label} has {ours!r}, {theirs_label} has {theirs!r}"


# ---- decode → prefill ----------------------------------------------------------------------


@dataclass
class NixlPool:
    """What a decode side of the ``nixl`` backend shares at registration (``KVRegister.extra``
    under ``"nixl"``): its NIXL agent's metadata and where the K/V page arrays of its pool
    (``k0, v0, k1, v1, ...``, each ``num_pages`` pages of ``page_bytes``) lie in ``memory``."""

    agent_metadata: bytes
    memory: str  # "DRAM" or "VRAM"
    device_id: int
    num_pages: int
    page_bytes: int
    addresses: list[int]  # the first byte of each array


@dataclass
class KVRegister(Message):
    """Register (or register again) with the prefill side. ``extra`` is what the backend needs
    to write to the decode pool (cuda_ipc: the pool's IPC handles; nixl: a ``NixlPool``
    under ``"nixl"``). ``session`` names the decode
    side's incarnation and ``epoch`` counts its losses of this link: a repeated REGISTER of the
    (session, epoch) already registered is answered, not redone."""

    TYPE: ClassVar[str] = "kv_register"
    layout: KVLayout
    extra: dict[str, Any] = field(default_factory=dict)
    session: str = ""
    epoch: int = 0


@dataclass
class KVRoom(Message):
    """Announce ``room`` and the destination pages its KV goes to."""

    TYPE: ClassVar[str] = "kv_room"
    room: int
    dst_pages: list[int]


@dataclass
class KVAck(Message):
    """Every page of ``room`` is written: the prefill side may free its source pages."""

    TYPE: ClassVar[str] = "kv_ack"
    room: int


# ---- prefill → decode ----------------------------------------------------------------------


@dataclass
class KVRegistered(Message):
    """The answer to a ``KVRegister`` of ``epoch`` (an answer to an older epoch is stale)."""

    TYPE: ClassVar[str] = "kv_registered"
    ok: bool
    error: str | None = None
    epoch: int = 0


@dataclass
class KVRoomOk(Message):
    TYPE: ClassVar[str] = "kv_room_ok"
    room: int


@dataclass
class KVRoomRefused(Message):
    TYPE: ClassVar[str] = "kv_room_refused"
    room: int
    error: str = ""


@dataclass
class TokenLogprob:
    """A sampled token's logprob and, when its request asked for them, the logprobs of the k
    most likely tokens: how the first token of a disaggregated request is described to the
    decode side, which streams it."""

    logprob: float
    top_token_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


@dataclass
class KVChunk(Message):
    """Pages of ``room`` written (cuda_ipc) or carried in the payload frames that follow (zmq).
    The last chunk carries the first sampled token and, when the prefill side has it, its
    logprob (with the top logprobs the request asked for)."""

    TYPE: ClassVar[str] = "kv_chunk"
    room: int
    dst_pages: list[int]
    last: bool = False
    first_token: int | None = None
    first_logprob: TokenLogprob | None = None


@dataclass
class KVAbortAck(Message):
    """The prefill side stopped writing ``room``: the decode side may reuse its pages."""

    TYPE: ClassVar[str] = "kv_abort_ack"
    room: int


@dataclass
class KVUnregistered(Message):
    """The answer to any frame of a decode side the prefill side does not know (any more)."""

    TYPE: ClassVar[str] = "kv_unregistered"
    error: str = ""


# ---- both ways -----------------------------------------------------------------------------


@dataclass
class KVAbort(Message):
    TYPE: ClassVar[str] = "kv_abort"
    room: int
    reason: str = "aborted"


@dataclass
class KVHeartbeat(Message):
    TYPE: ClassVar[str] = "kv_heartbeat"


# ---- within a tensor-parallel decode instance (rank 0 → the other ranks, over the step relay) --


@dataclass
class ShardLanding:
    """One landed chunk: its destination ``pages`` and, by rank, the bytes of that rank's KV
    heads of them (a staging buffer of the rank's pool; empty for rank 0, which landed its own)."""

    pages: list[int]
    shards: list[bytes]


@dataclass
class KVShardPages(Message):
    """Rank 0 of a tensor-parallel decode instance received these chunks: the other ranks land
    their heads of them before the next step (``kvtransfer.tp_hub``)."""

    TYPE: ClassVar[str] = "kv_shard_pages"
    landings: list[ShardLanding]
