"""How a step reaches every rank of a tensor-parallel instance once: rank 0 alone reads the
scheduler's step socket and, before acting on a frame, broadcasts its msgpack bytes (a uint8
tensor over the gloo group: bytes, never pickle) to the other ranks, which decode it with the
same codec. The scheduler sends one copy, whatever the number of ranks.

While no frame comes, rank 0 broadcasts an empty one each poll interval: the other ranks come
back to the interpreter (so their signal handlers run) and no collective outwaits its timeout
on an idle instance. A single rank relays nothing (``NO_RELAY``), chosen once at start-up.
A rank that died makes the others' next broadcast fail: ``RankLost``, and the process ends (the
launcher restarts the whole instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from engine.parallel.group import TensorParallel

DRIVER_RANK = 0


class RankLost(RuntimeError):
    """Another rank of this instance is gone (its connection closed, or the group timed out)."""


class Relay(Protocol):
    def forward(self, frame: bytes) -> None: ...
    def idle(self) -> None: ...


class NoRelay:
    """One rank: nobody to tell."""

    def forward(self, frame: bytes) -> None:
        pass

    def idle(self) -> None:
        pass


NO_RELAY = NoRelay()


@dataclass
class StepRelay:
    """Rank 0's side: every frame from the scheduler goes to the other ranks first."""

    tp: TensorParallel

    def forward(self, frame: bytes) -> None:
        if not frame:
            raise ValueError("an empty frame cannot be relayed (it means 'nothing yet')")
        _broadcast_length(self.tp, len(frame))
        payload = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        _broadcast(self.tp, payload)

    def idle(self) -> None:
        _broadcast_length(self.tp, 0)


def make_relay(tp: TensorParallel) -> Relay:
    return NO_RELAY if tp.size == 1 else StepRelay(tp)


def receive_frame(tp: TensorParallel) -> bytes | None:
    """The other ranks' side: the next frame rank 0 relayed, or None for an idle beat."""
    length = _broadcast_length(tp, 0)
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
        raise RankLost(f"rank {tp.rank}: another rank of this instance is gone ({e})") from None
