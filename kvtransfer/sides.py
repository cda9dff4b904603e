"""What every backend's sender and receiver set up the same way: the worker's own KV pool,
checked against the layout, and the room table. Each backend adds only its transport, started
by the ``_bind`` / ``_start`` hook at the end of construction.

A side of a tensor-parallel instance advertises the instance's ``layout`` (every rank's KV heads)
while its own pool holds its rank's (``pool_layout``); through rank 0, a decode side's ``lander``
puts each landed page's heads where they belong (``kvtransfer.tp_hub``)."""

from __future__ import annotations

import uuid
from abc import abstractmethod
from collections.abc import Sequence

import torch

from kvtransfer.base import KVReceiver, KVSender, TransferConfig, TransferState
from kvtransfer.kernels import Lander, PagedCaches, PoolLander
from kvtransfer.layout import check_caches
from kvtransfer.rooms import RoomTable
from protocol.dataplane import KVLayout


class _PoolSide:
    layout: KVLayout
    pool: PagedCaches
    rooms: RoomTable

    def _own_pool(
        self,
        layout: KVLayout,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        config: TransferConfig | None,
        pool_layout: KVLayout | None = None,
    ) -> None:
        """Check the pool (per-layer ``k_caches`` / ``v_caches``) against ``pool_layout`` (by
        default ``layout``, the one advertised); keep it."""
        check_caches(pool_layout or layout, k_caches, v_caches)
        self.layout = layout
        self.pool = PagedCaches(k_caches, v_caches)
        self.rooms = RoomTable(config or TransferConfig())


class PoolSender(_PoolSide, KVSender):
    """A prefill side over this worker's KV pool."""

    def __init__(
        self,
        layout: KVLayout,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        address: str,
        config: TransferConfig | None = None,
        pool_layout: KVLayout | None = None,
    ) -> None:
        self._own_pool(layout, k_caches, v_caches, config, pool_layout)
        self.address = self._bind(address)

    @abstractmethod
    def _bind(self, address: str) -> str:
        """Start the transport at ``address``; returns the address decode sides reach us at."""

    def add_room(self, room: int) -> None:
        self.rooms.claim(room, TransferState.BOOTSTRAPPING)


class PoolReceiver(_PoolSide, KVReceiver):
    """A decode side over this worker's KV pool; ``name`` identifies it to its prefill peers."""

    def __init__(
        self,
        layout: KVLayout,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        config: TransferConfig | None = None,
        name: str | None = None,
        pool_layout: KVLayout | None = None,
        lander: Lander | None = None,
    ) -> None:
        self._own_pool(layout, k_caches, v_caches, config, pool_layout)
        self.lander = lander or PoolLander(self.pool)
        self.name = name or f"decode-{uuid.uuid4().hex[:12]}"
        self._start()

    @abstractmethod
    def _start(self) -> None:
        """Start the transport (no peer yet: ``register`` connects to them)."""
