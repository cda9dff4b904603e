"""KV data plane between a prefill worker (``KVSender``) and a decode worker (``KVReceiver``).

Backends: ``zmq`` (host-staged, any two hosts), ``cuda_ipc`` (same host, device-to-device into
the decode pool), ``nixl`` (one-sided NIXL / UCX writes into the decode pool; needs the optional
``nixl-cu12`` package, imported only when chosen), ``fake`` (in-process, with delay / failure
injection for tests). Build one side with ``make_backend``; the interface and call order are
documented in ``kvtransfer.base``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.base import (
    DuplicateRoom,
    KVReceiver,
    KVSender,
    LayoutMismatch,
    RegistrationRefused,
    RoomResult,
    TransferConfig,
    TransferError,
    TransferState,
)
from kvtransfer.kernels import Lander
from kvtransfer.layout import check_caches, check_peer_layout, layout_from_caches, torch_dtype
from protocol.dataplane import TP_HUB_BACKENDS, KVLayout

BACKENDS = ("zmq", "cuda_ipc", "nixl", "fake")
ROLES = ("prefill", "decode")

__all__ = [
    "BACKENDS",
    "DuplicateRoom",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "LayoutMismatch",
    "RegistrationRefused",
    "RoomResult",
    "TransferConfig",
    "TransferError",
    "TransferState",
    "check_caches",
    "check_peer_layout",
    "layout_from_caches",
    "make_backend",
    "torch_dtype",
]


def make_backend(
    name: str,
    role: str,
    layout: KVLayout,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    *,
    address: str | None = None,
    config: TransferConfig | None = None,
    pool_layout: KVLayout | None = None,
    lander: Lander | None = None,
) -> KVSender | KVReceiver:
    """The ``role`` side ("prefill" → KVSender bound at ``address``; "decode" → KVReceiver)
    of backend ``name`` over this worker's KV pool (per-layer ``k_caches`` / ``v_caches``).
    A tensor-parallel rank advertises the instance's ``layout`` over its own pool
    (``pool_layout``); through rank 0, its decode side lands pages through ``lander``
    (``kvtransfer.tp_hub``), which only the backends of ``TP_HUB_BACKENDS`` can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    if layout.backend != name:
        raise LayoutMismatch("backend", name, layout.backend, "layout")
    if role == "prefill" and not address:
        raise ValueError("the prefill side needs an explicit address to bind (tcp://host:port or ipc://path)")
    if lander is not None and name not in TP_HUB_BACKENDS:
        raise ValueError(
            f"the {name} KV transfer backend moves pool to pool: every rank moves its own heads "
            f"(kvtransfer.tp_parts); only {', '.join(TP_HUB_BACKENDS)} land an instance's "
            "through rank 0"
        )
    sender_cls, receiver_cls = _classes(name)
    if role == "prefill":
        if pool_layout is None:
            return sender_cls(layout, k_caches, v_caches, address, config)
        return sender_cls(layout, k_caches, v_caches, address, config, pool_layout=pool_layout)
    if pool_layout is None and lander is None:
        return receiver_cls(layout, k_caches, v_caches, config)
    return receiver_cls(layout, k_caches, v_caches, config, pool_layout=pool_layout, lander=lander)


def _classes(name: str) -> tuple[type, type]:
    """Import only the chosen backend (cuda_ipc needs CUDA, nixl its package, fake is for tests)."""
    if name == "zmq":
        from kvtransfer.zmq_backend import ZmqReceiver, ZmqSender

        return ZmqSender, ZmqReceiver
    if name == "cuda_ipc":
        from kvtransfer.cuda_ipc_backend import CudaIpcReceiver, CudaIpcSender

        return CudaIpcSender, CudaIpcReceiver
    if name == "nixl":
        from kvtransfer.nixl_backend import NixlReceiver, NixlSender

        return NixlSender, NixlReceiver
    from kvtransfer.fake import FakeReceiver, FakeSender

    return FakeSender, FakeReceiver
