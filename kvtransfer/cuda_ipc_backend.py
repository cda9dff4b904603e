"""``cuda_ipc`` backend: same host, the prefill worker writes straight into the decode pool.

At registration the decode worker shares a CUDA IPC handle for every K/V cache array of its
pool (msgpack bytes and ints, taken from ``torch.multiprocessing.reductions``; no pickle). The
prefill worker opens them once per peer; each ``send`` then runs one ``copy_pages`` kernel from
its own pool into the decode pool on the I/O thread's stream, ordered after the forward that
wrote the pages and synchronized before the decode side is told (a header-only CHUNK frame).
Because the prefill process writes the decode pages itself, a decode-side abort or timeout is
reported only after the prefill side acknowledges it (or is found dead): see ``LinkReceiver``.

The decode pool may live on another GPU of the host if that GPU is visible to the prefill
process (matched by UUID) and peer access is possible; otherwise registration is refused with
a message saying so, and the ``zmq`` backend is the way.
"""

from __future__ import annotations

from typing import Any

import torch
import zmq
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kvtransfer.kernels import DeviceLane, PagedCaches, copy_pages
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.link_sender import Chunk, LinkSender


def share_cuda_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A msgpack-able description of ``t`` that another process can open (``open_cuda_tensor``)."""
    _, args = reduce_tensor(t)
    (_, size, stride, offset, _, _, _, handle, storage_bytes, storage_offset, _,
     ref_handle, ref_offset, event_handle, event_sync) = args  # fmt: skip
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": offset,
        "dtype": str(t.dtype).removeprefix("torch."),
        "device_uuid": str(torch.cuda.get_device_properties(t.device).uuid),
        "handle": handle,
        "storage_bytes": storage_bytes,
        "storage_offset": storage_offset,
        "ref_handle": ref_handle,
        "ref_offset": ref_offset,
        "event_handle": event_handle,
        "event_sync": event_sync,
    }


def open_cuda_tensor(d: dict[str, Any]) -> torch.Tensor:
    """Open a tensor shared by ``share_cuda_tensor`` in another process (never the same one)."""
    device = _local_device_with_uuid(d["device_uuid"])
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(d["size"]), tuple(d["stride"]), d["offset"], torch.storage.TypedStorage,
        getattr(torch, d["dtype"]), device, d["handle"], d["storage_bytes"], d["storage_offset"], False,
        d["ref_handle"], d["ref_offset"], d["event_handle"], d["event_sync"],
    )


def _local_device_with_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise ValueError(
        f"the decode KV pool is on GPU {uuid}, which this prefill process cannot see "
        "(use the zmq backend between hosts or isolated GPUs)"
    )


def _require_cuda(pool: PagedCaches) -> PagedCaches:
    if pool.device.type != "cuda":
        raise ValueError("the cuda_ipc backend needs a KV pool on a CUDA device")
    return pool


class CudaIpcSenderMover:
    def __init__(self, pool: PagedCaches) -> None:
        self._pool = _require_cuda(pool)
        self._lane = DeviceLane(pool)
        self._peers: dict[str, PagedCaches] = {}

    def open_peer(self, peer: str, extra: dict[str, Any]) -> None:
        arrays = [open_cuda_tensor(d) for d in extra.get("arrays", [])]
        if not arrays:
            raise ValueError("the decode side shared no KV cache handles")
        remote = PagedCaches(arrays[0::2], arrays[1::2])
        if (remote.num_arrays, remote.page_shape, remote.dtype) != (
            self._pool.num_arrays, self._pool.page_shape, self._pool.dtype
        ):
            raise ValueError("the decode KV pool's shared arrays do not match the registered layout")
        if remote.device != self._pool.device and not torch.cuda.can_device_access_peer(
            self._pool.device, remote.device
        ):
            raise ValueError(f"{self._pool.device} cannot write to {remote.device} (no peer access)")
        self._peers[peer] = remote

    def close_peer(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def transmit(self, peer: str, chunk: Chunk) -> list[Any]:
        if chunk.src_pages:
            with self._lane.running(after=chunk.ready):
                copy_pages(self._pool, chunk.src_pages, self._peers[peer], chunk.dst_pages)
        return []


class CudaIpcReceiverMover:
    remote_writes = True

    def __init__(self, pool: PagedCaches) -> None:
        self._pool = _require_cuda(pool)

    def registration(self) -> dict[str, Any]:
        return {"arrays": [share_cuda_tensor(a) for a in self._pool.arrays]}

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        if payload:
            raise ValueError("a cuda_ipc chunk carries no payload")


class CudaIpcSender(LinkSender):
    """Prefill side of the cuda_ipc backend; binds ``address`` for its peers' control frames."""

    mover_class = CudaIpcSenderMover


class CudaIpcReceiver(LinkReceiver):
    """Decode side of the cuda_ipc backend: shares its pool once, at registration."""

    mover_class = CudaIpcReceiverMover
