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

A peer's description of each array is checked before any handle is opened (``check_shared``):
the dtype against an allow list, and the fields' types, the page shape and the extent against
the storage, so that a malformed or hostile registration is refused, never opened.
"""

from __future__ import annotations

from typing import Any

import torch
import zmq
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kvtransfer.kernels import DeviceLane, PagedCaches, copy_pages
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.link_sender import Chunk, LinkSender
from protocol.dataplane import KVLayout

SHARED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_DIMS = 8
_INT_FIELDS = ("offset", "storage_bytes", "storage_offset", "ref_offset")
_BYTES_FIELDS = ("handle", "ref_handle")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_shared(d: object, page_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise ValueError unless ``d`` describes one K/V array of ``page_shape`` pages of ``dtype``
    that lies within its shared storage (a peer's ``share_cuda_tensor``, before it is opened)."""
    if not isinstance(d, dict):
        raise ValueError("a shared KV array must be a map")
    name = d.get("dtype")
    if SHARED_DTYPES.get(name) is not dtype:  # type: ignore[arg-type]
        raise ValueError(f"shared KV array dtype {name!r} is not this pool's {dtype}")
    size, stride = d.get("size"), d.get("stride")
    if not (isinstance(size, list) and isinstance(stride, list) and 1 <= len(size) == len(stride) <= _MAX_DIMS
            and all(map(_is_count, size + stride))):
        raise ValueError("a shared KV array needs size and stride lists of non-negative ints")
    if tuple(size[1:]) != tuple(page_shape) or size[0] < 1:
        raise ValueError(f"shared KV array of shape {size} does not hold pages of shape {list(page_shape)}")
    if not all(_is_count(d.get(k)) for k in _INT_FIELDS) or not all(
        isinstance(d.get(k), bytes) for k in _BYTES_FIELDS
    ):
        raise ValueError(f"a shared KV array needs non-negative ints {_INT_FIELDS} and bytes {_BYTES_FIELDS}")
    if not (isinstance(d.get("device_uuid"), str) and isinstance(d.get("event_sync"), bool)
            and isinstance(d.get("event_handle"), bytes | None)):
        raise ValueError("a shared KV array needs a device_uuid, event_handle and event_sync")
    last = d["offset"] + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if (last + 1) * dtype.itemsize > d["storage_bytes"]:
        raise ValueError("a shared KV array reaches past the end of its storage")


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
        SHARED_DTYPES[d["dtype"]], device, d["handle"], d["storage_bytes"], d["storage_offset"], False,
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

    def open_peer(self, peer: str, extra: dict[str, Any], theirs: KVLayout) -> None:
        shared = extra.get("arrays")
        if not isinstance(shared, list) or not shared:
            raise ValueError("the decode side shared no KV cache handles")
        if len(shared) != self._pool.num_arrays:
            raise ValueError(
                f"the decode side shared {len(shared)} KV arrays; this pool has {self._pool.num_arrays}"
            )
        for d in shared:
            check_shared(d, self._pool.page_shape, self._pool.dtype)
        arrays = [open_cuda_tensor(d) for d in shared]
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
