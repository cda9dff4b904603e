"""``zmq`` backend: host-staged KV transfer that works between any two hosts.

Prefill: one gather kernel copies the chunk's pages of every layer into a staging buffer on the
device, one copy moves it into a pinned host buffer, and zmq sends that buffer as a payload
frame without copying it (``copy=False``). Decode: the frame is copied once into a pinned
buffer, moved to the device and scattered into the destination pages by one kernel. On CPU
pools the staging buffer itself is the payload. Device work runs on the I/O thread's own CUDA
stream, ordered after the forward that wrote the pages by an event recorded at ``send``.

A tensor-parallel instance's rank 0 sends the staging buffer its ranks gathered (``Chunk.staged``,
on the host) as it is, and lands what it receives through its ``Lander`` (``kvtransfer.tp_hub``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import zmq

from kvtransfer.kernels import DeviceLane, Lander, PagedCaches
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.link_sender import Chunk, LinkSender
from protocol.dataplane import KVLayout


class ZmqSenderMover:
    def __init__(self, pool: PagedCaches) -> None:
        self._lane = DeviceLane(pool)

    def open_peer(self, peer: str, extra: dict[str, Any], theirs: KVLayout) -> None:
        pass

    def close_peer(self, peer: str) -> None:
        pass

    def transmit(self, peer: str, chunk: Chunk) -> list[Any]:
        if not chunk.src_pages:
            return []
        if chunk.staged is not None:  # already gathered (every rank's heads), on the host
            return [chunk.staged.reshape(-1).view(torch.uint8).numpy()]
        lane = self._lane
        with lane.running(after=chunk.ready):
            staging = lane.ops.gather(lane.pool, chunk.src_pages)
            payload = staging.view(-1).view(torch.uint8)
            if lane.stream is not None:
                host = lane.host_buffer(payload.numel())
                host.copy_(payload, non_blocking=True)
                payload = host
        # numpy keeps the tensor alive until zmq has sent the frame (zero-copy send).
        return [payload.numpy()]


class ZmqReceiverMover:
    remote_writes = False

    def __init__(self, pool: PagedCaches, lander: Lander) -> None:
        self._lane = DeviceLane(pool)
        self._lander = lander

    def registration(self) -> dict[str, Any]:
        return {}

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        if not dst_pages:
            if payload:
                raise ValueError("a chunk without pages carries a payload")
            return
        lander = self._lander
        shape = lander.staging_shape(len(dst_pages))
        nbytes = math.prod(shape) * lander.dtype.itemsize
        if len(payload) != 1 or len(payload[0].buffer) != nbytes:
            got = sum(len(f.buffer) for f in payload)
            raise ValueError(f"payload of {got} bytes in {len(payload)} frames; expected {nbytes} in 1")
        host = self._lane.host_buffer(nbytes)
        host.numpy()[:] = np.frombuffer(payload[0].buffer, dtype=np.uint8)
        lander.land(dst_pages, host.view(lander.dtype).view(shape))


class ZmqSender(LinkSender):
    """Prefill side of the zmq backend; ``address`` is ``tcp://host:port`` or ``ipc://path``
    (``tcp://host:*`` picks a free port; read the bound one from ``.address``)."""

    mover_class = ZmqSenderMover


class ZmqReceiver(LinkReceiver):
    """Decode side of the zmq backend."""

    def mover_class(self, pool: PagedCaches) -> ZmqReceiverMover:  # type: ignore[override]
        return ZmqReceiverMover(pool, self.lander)
