"""How a step reaches every rank of a tensor-parallel instance once: rank 0 alone reads the
scheduler's step socket and, before acting on a frame, broadcasts its msgpack bytes (a uint8
tensor over the gloo group: bytes, never pickle) to the other ranks, which decode it with the
same codec. The scheduler sends one copy, whatever the number of ranks.

When rank 0 stops serving (the scheduler's ``Shutdown``, which it relays as any frame, or a
signal or an error) the other ranks are told (an end mark, ``finish``) before rank 0 closes the
group, so that all of them close it together and at once.

While no frame comes, rank 0 broadcasts an empty one each poll interval: the other ranks come
back to the interpreter (so their signal handlers run) and no collective outwaits its timeout
on an idle instance. A single rank relays nothing (``NO_RELAY``), chosen once at start-up.
A rank that died makes the others' next broadcast fail: ``RankLost``, and the process ends (the
launcher restarts the whole instance).

A disaggregated instance over zmq moves its KV through rank 0 (``kvtransfer.tp_hub``): a
prefill instance's ranks ``gather_to_driver`` the pages each step sends, right after the step; a
decode instance's rank 0 relays the other ranks' heads of the pages it received before each
frame and on idle beats (``FlushingRelay``), so they land before any later step reads them.
(Over nixl and cuda_ipc each rank moves its own: ``kvtransfer.tp_parts``.)

Ranks started by different launchers (``--nnodes``) first check that they agree with rank 0 on
what their collectives depend on (``check_ranks_agree``), the same bytes-over-gloo way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgpack
import torch
import torch.distributed as dist

from engine.parallel.group import RankLost, TensorParallel

DRIVER_RANK = 0
END_MARK = -1  # a frame length that means "rank 0 has stopped serving"
REPORT_BYTES = 256  # of each rank's differences from rank 0, as rank 0 reports them


class RelayEnded(Exception):
    """Rank 0 has stopped serving (``END_MARK``): the other ranks stop too."""


class Relay(Protocol):
    def forward(self, frame: bytes) -> None: ...
    def idle(self) -> None: ...
    def finish(self, shutdown_relayed: bool = False) -> None: ...


class NoRelay:
    """One rank: nobody to tell."""

    def forward(self, frame: bytes) -> None:
        pass

    def idle(self) -> None:
        pass

    def finish(self, shutdown_relayed: bool = False) -> None:
        pass


NO_RELAY = NoRelay()


@dataclass
class StepRelay:
    """Rank 0's side: every frame from the scheduler goes to the other ranks first."""

    tp: TensorParallel
    finished: bool = False

    def forward(self, frame: bytes) -> None:
        if not frame:
            raise ValueError("an empty frame cannot be relayed (it means 'nothing yet')")
        _broadcast_bytes(self.tp, frame)

    def idle(self) -> None:
        _broadcast_length(self.tp, 0)

    def finish(self, shutdown_relayed: bool = False) -> None:
        """Rank 0 stops serving: the other ranks stop following (unless the ``Shutdown`` it
        relayed told them already). A rank already gone is not waited for."""
        if self.finished:
            return
        self.finished = True
        if not shutdown_relayed:
            with contextlib.suppress(RankLost):
                _broadcast_length(self.tp, END_MARK)


def make_relay(tp: TensorParallel) -> Relay:
    return NO_RELAY if tp.size == 1 else StepRelay(tp)


Flush = Callable[[Callable[[bytes], None]], bool]


@dataclass
class FlushingRelay:
    """Rank 0 of a tensor-parallel decode instance: ``flush(send)`` sends what waits for the other
    ranks (the heads of landed pages, one frame) through ``send`` and says whether it did; it runs
    before every frame, and an idle beat that flushed needs no empty frame."""

    relay: StepRelay
    flush: Flush

    def forward(self, frame: bytes) -> None:
        self.flush(self.relay.forward)
        self.relay.forward(frame)

    def idle(self) -> None:
        if not self.flush(self.relay.forward):
            self.relay.idle()

    def finish(self, shutdown_relayed: bool = False) -> None:
        self.relay.finish(shutdown_relayed)


def gather_to_driver(
    tp: TensorParallel, tensor: torch.Tensor, shapes: Sequence[Sequence[int]]
) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (a host tensor of that rank's shape in ``shapes``, one dtype
    everywhere), by rank, on rank 0; None on the others. Every rank calls it at the same point of
    its loop. Ranks of an uneven split hold tensors of different sizes: each is sent padded to
    the largest (a gather moves equal sizes) and cut back on rank 0."""
    sizes = [math.prod(shape) for shape in shapes]
    width = max(sizes)
    host = tensor.contiguous().view(-1)
    if host.numel() < width:
        host = torch.cat([host, host.new_zeros(width - host.numel())])
    parts = [torch.empty_like(host) for _ in range(tp.size)] if tp.rank == DRIVER_RANK else None
    try:
        dist.gather(host, parts, dst=DRIVER_RANK, group=tp.control)
    except RuntimeError as e:
        raise tp.lost(e) from None
    if parts is None:
        return None
    return [part[:size].view(tuple(shape)) for part, size, shape in zip(parts, sizes, shapes, strict=True)]


def gather_strings(tp: TensorParallel, text: str, width: int = 256) -> list[str] | None:
    """Every rank's ``text`` (UTF-8, at most ``width`` bytes), by rank, on rank 0; None on the
    others. Every rank calls it at the same point of its loop."""
    data = text.encode()
    if len(data) > width:
        raise ValueError(f"{text!r} is longer than {width} bytes")
    padded = torch.zeros(width, dtype=torch.uint8)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = gather_to_driver(tp, padded, [(width,)] * tp.size)
    if parts is None:
        return None
    return [bytes(part.numpy().tobytes()).rstrip(b"\0").decode() for part in parts]


def differences_from_rank_0(tp: TensorParallel, facts: Mapping[str, object]) -> list[str]:
    """Rank 0 broadcasts its ``facts`` (msgpack: plain values, lists, maps); every rank returns
    what differs in its own, each as ``name: mine (rank 0: theirs)``. Every rank calls it at
    the same point, with facts of the same names."""
    packed = msgpack.packb(dict(facts))
    mine = msgpack.unpackb(packed)  # as they travel: tuples become lists
    theirs = msgpack.unpackb(_broadcast_bytes(tp, packed))
    return [f"{name}: {mine.get(name)!r} (rank 0: {theirs.get(name)!r})"
            for name in sorted(theirs.keys() | mine.keys()) if mine.get(name) != theirs.get(name)]


def _broadcast_bytes(tp: TensorParallel, data: bytes) -> bytes:
    """Rank 0's ``data`` on every rank (the other ranks' ``data`` is not sent)."""
    length = _broadcast_length(tp, len(data))
    if tp.rank == DRIVER_RANK:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        payload = torch.empty(length, dtype=torch.uint8)
    _broadcast(tp, payload)
    return payload.numpy().tobytes()


def check_ranks_agree(tp: TensorParallel, facts: Mapping[str, object], advice: str) -> None:
    """Refuse to go on, on every rank that differs and on rank 0, when the ranks' ``facts``
    (what they must agree on for their collectives to meet: the model, the batch sizes) are
    not rank 0's. Each rank names its own differences; rank 0 names every rank's (the first
    ``REPORT_BYTES`` of each), with ``advice``. A rank that agrees goes on: rank 0's refusal
    ends it at its next collective."""
    differences = differences_from_rank_0(tp, facts)
    report = _clipped("; ".join(differences), REPORT_BYTES)
    reports = gather_strings(tp, report, REPORT_BYTES)
    if differences:
        raise ValueError(f"rank {tp.rank} differs from rank 0: {'; '.join(differences)}. {advice}")
    disagreeing = [f"rank {rank}: {text}" for rank, text in enumerate(reports or []) if text]
    if disagreeing:
        raise ValueError(f"ranks differ from rank 0: {' | '.join(disagreeing)}. {advice}")


def _clipped(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (at a character boundary)."""
    return text.encode()[:limit].decode(errors="ignore")


def receive_frame(tp: TensorParallel) -> bytes | None:
    """The other ranks' side: the next frame rank 0 relayed, or None for an idle beat; raises
    ``RelayEnded`` once rank 0 has stopped serving."""
    length = _broadcast_length(tp, 0)
    if length == END_MARK:
        raise RelayEnded
    if length == 0:
        return None
    payload = torch.empty(length, dtype=torch.uint8)
    _broadcast(tp, payload)
    return payload.numpy().tobytes()


def _broadcast_length(tp: TensorParallel, length: int) -> int:
    header = torch.tensor([length], dtype=torch.int64)
    _broadcast(tp, header)
    return int(header.item())


def _broadcast(tp: TensorParallel, tensor: torch.Tensor) -> None:
    try:
        dist.broadcast(tensor, DRIVER_RANK, group=tp.control)
    except RuntimeError as e:  # gloo: "Connection closed by peer", or a timeout
        raise tp.lost(e) from None
