"""KV transfer between instances of different ``--tp-size``s (``kvtransfer.tp_hub``): the head
mapping, the registration check, and whole rooms over the zmq and fake backends in one process,
with a decode instance's rank 0 landing its own heads and relaying the others'."""

from __future__ import annotations

import pytest
import torch

from kvtransfer import KVReceiver, KVSender, LayoutMismatch, check_peer_layout, make_backend
from kvtransfer.kernels import PagedCaches, PoolLander, gather_pages_ref
from kvtransfer.tp_hub import HeadRange, HeldResults, HubLander, InstanceHeads, instance_layout, land_shards
from protocol.codec import decode
from protocol.dataplane import KVShardPages
from tests.unit.kvtransfer.kv_helpers import (
    FAST,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    PAGE_SIZE,
    Pool,
    address,
    layout,
    pool,
    wait_results,
)

SHARDED = InstanceHeads(2, (HeadRange(0, 1), HeadRange(1, 1)))


def heads_of(num_kv_heads: int, tp_size: int) -> InstanceHeads:
    """As an instance of ``tp_size`` ranks splits a model of ``num_kv_heads`` KV heads."""
    return InstanceHeads.dealt(num_kv_heads, tp_size)


def test_each_head_comes_from_one_rank_once_sharded_or_replicated() -> None:
    assert heads_of(2, 1).sources() == [0]
    assert heads_of(2, 2).sources() == [0, 1]
    assert heads_of(4, 2).ranks == (HeadRange(0, 2), HeadRange(2, 2))
    assert heads_of(3, 2).ranks == (HeadRange(0, 2), HeadRange(2, 1))  # dealt out whole: uneven
    assert heads_of(3, 2).sources() == [0, 1]
    replicated = heads_of(2, 4)  # each KV head on two ranks: the lower one is the source
    assert replicated.ranks == (HeadRange(0, 1), HeadRange(0, 1), HeadRange(1, 1), HeadRange(1, 1))
    assert replicated.sources() == [0, 2]


@pytest.mark.parametrize(
    "ranks", [(HeadRange(0, 1),), (HeadRange(0, 1), HeadRange(2, 1)), (HeadRange(0, 2), HeadRange(1, 1))]
)
def test_ranks_that_do_not_tile_the_heads_are_refused(ranks: tuple[HeadRange, ...]) -> None:
    with pytest.raises(ValueError, match="do not tile the model's 2 heads"):
        InstanceHeads(2, ranks)


def test_assemble_and_slice_are_inverse() -> None:
    heads = heads_of(4, 2)
    whole = torch.randn(2 * NUM_LAYERS, 3, PAGE_SIZE, 4, HEAD_DIM)
    parts = [heads.slice_of(whole, r) for r in range(heads.size)]
    assert parts[1].shape[3] == 2 and parts[1].is_contiguous()
    assert torch.equal(heads.assemble(parts), whole)
    replicated = heads_of(2, 4)
    two = torch.randn(2 * NUM_LAYERS, 3, PAGE_SIZE, 2, HEAD_DIM)
    assert torch.equal(replicated.assemble([replicated.slice_of(two, r) for r in range(4)]), two)
    uneven = heads_of(3, 2)  # 2 heads on rank 0, 1 on rank 1
    three = torch.randn(2 * NUM_LAYERS, 3, PAGE_SIZE, 3, HEAD_DIM)
    assert [uneven.slice_of(three, r).shape[3] for r in range(2)] == [2, 1]
    assert torch.equal(uneven.assemble([uneven.slice_of(three, r) for r in range(2)]), three)


def test_the_layout_check_maps_tp_sizes_over_zmq_fake_and_nixl_and_ranks_over_nixl_only() -> None:
    for backend in ("zmq", "fake"):
        one, two = layout(backend), layout(backend, tp_size=2)
        assert one.mismatch(two) is None
        check_peer_layout(one, two)
        for name, value in [("num_kv_heads", 4), ("head_dim", 16), ("tp_rank", 1)]:
            with pytest.raises(LayoutMismatch, match=f"{name} mismatch"):
                check_peer_layout(two, layout(backend, **{name: value}))
    two_of_nixl = layout("nixl", tp_size=2, tp_rank=1)
    assert layout("nixl").mismatch(two_of_nixl) is None  # which heads go where: kvtransfer.tp_slices
    assert layout("nixl").mismatched_field(layout("nixl", num_kv_heads=4)) == "num_kv_heads"
    assert layout("cuda_ipc").mismatched_field(layout("cuda_ipc", tp_size=2)) == "tp_size"
    rank_1 = layout("cuda_ipc", tp_size=2, tp_rank=1)
    assert layout("cuda_ipc", tp_size=2).mismatched_field(rank_1) == "tp_rank"


def test_pool_to_pool_backends_land_no_other_rank_s_heads() -> None:
    """nixl and cuda_ipc move each rank's own pool (``kvtransfer.tp_parts``): no hub lander."""
    src = pool(seed=0)
    for backend in ("nixl", "cuda_ipc"):
        with pytest.raises(ValueError, match=f"the {backend} KV transfer backend moves pool to pool"):
            hub = HubLander(PagedCaches(*src), SHARDED)
            make_backend(backend, "decode", layout(backend), *src, lander=hub)


def head_pool(whole: Pool, head: int) -> Pool:
    """KV head ``head`` of ``whole``: what one rank of a TP 2 instance holds."""
    k, v = ([t[:, :, head : head + 1].contiguous() for t in caches] for caches in whole)
    return k, v


def rank_pool(seed: int | None = None) -> Pool:
    return head_pool(pool(seed), 0)


def heads_equal(whole: Pool, pages: list[int], rank: Pool, rank_pages: list[int], head: int) -> bool:
    return all(
        torch.equal(r[rank_pages], w[pages][:, :, head : head + 1])
        for w_caches, r_caches in zip(whole, rank, strict=True)
        for w, r in zip(w_caches, r_caches, strict=True)
    )


@pytest.mark.parametrize("backend", ["zmq", "fake"])
def test_a_tp1_prefill_reaches_both_ranks_of_a_tp2_decode(backend: str) -> None:
    """Rank 0's receiver lands head 0 and keeps head 1; the room's result waits for the relay."""
    src, rank0, rank1 = pool(seed=0), rank_pool(), rank_pool()
    pool_layout = layout(backend, num_kv_heads=1)
    hub = HubLander(PagedCaches(*rank0), SHARDED)
    sender = make_backend(backend, "prefill", layout(backend), *src, address=address(backend), config=FAST)
    receiver = make_backend(
        backend, "decode", instance_layout(pool_layout, SHARDED), *rank0, config=FAST,
        pool_layout=pool_layout, lander=hub,
    )
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    assert receiver.layout.num_kv_heads == 2 and receiver.layout.tp_size == 2
    results = HeldResults(receiver, hub)
    try:
        peer = receiver.register(sender.address, timeout=5.0)
        sender.add_room(7)
        receiver.expect(7, peer, [3, 4, 5])
        sender.send(7, [1, 2], [3, 4])
        sender.send(7, [6], [5], first_token=11)
        assert wait_results(sender)[0].ok
        assert results.poll(0.3) == []  # landed on rank 0, not yet on rank 1
        assert heads_equal(src, [1, 2, 6], rank0, [3, 4, 5], head=0)
        frames: list[bytes] = []
        assert hub.flush(frames.append) and not hub.flush(frames.append)
        (done,) = results.poll(2.0)
        assert done.ok and done.first_token == 11
        msg = decode(frames[0])
        assert isinstance(msg, KVShardPages)
        land_shards(PoolLander(PagedCaches(*rank1)), msg, rank=1)
        assert heads_equal(src, [1, 2, 6], rank1, [3, 4, 5], head=1)
    finally:
        receiver.close()
        sender.close()


@pytest.mark.parametrize("backend", ["zmq", "fake"])
def test_a_tp2_prefill_sends_every_head_to_a_tp1_decode(backend: str) -> None:
    """Rank 0's sender, over its one-head pool, sends the staging buffer the ranks gathered."""
    whole, dst = pool(seed=1), pool()
    ranks = [head_pool(whole, h) for h in range(NUM_KV_HEADS)]
    pool_layout = layout(backend, num_kv_heads=1)
    sender = make_backend(
        backend, "prefill", instance_layout(pool_layout, SHARDED), *ranks[0], address=address(backend),
        config=FAST, pool_layout=pool_layout,
    )
    receiver = make_backend(backend, "decode", layout(backend), *dst, config=FAST)
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    try:
        peer = receiver.register(sender.address, timeout=5.0)
        sender.add_room(9)
        receiver.expect(9, peer, [8, 9])
        parts = [gather_pages_ref(PagedCaches(*r), [2, 3]) for r in ranks]
        sender.send(9, [2, 3], [8, 9], first_token=5, staged=SHARDED.assemble(parts))
        (result,) = wait_results(receiver)
        assert result.ok and result.first_token == 5
        for h in range(NUM_KV_HEADS):
            assert heads_equal(whole, [2, 3], head_pool(dst, h), [8, 9], head=h)
        assert wait_results(sender)[0].ok
    finally:
        receiver.close()
        sender.close()


def test_a_payload_of_one_rank_only_fails_the_room() -> None:
    """A TP 2 decode rank 0 expects every head: a one-head payload is refused, the room fails."""
    src, rank0 = rank_pool(seed=2), rank_pool()
    pool_layout = layout("zmq", num_kv_heads=1)
    sender = make_backend("zmq", "prefill", pool_layout, *src, address=address("zmq"), config=FAST)
    receiver = make_backend(
        "zmq", "decode", pool_layout, *rank0, config=FAST, pool_layout=pool_layout,
        lander=HubLander(PagedCaches(*rank0), SHARDED),
    )
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    try:
        peer = receiver.register(sender.address, timeout=5.0)
        sender.add_room(3)
        receiver.expect(3, peer, [1])
        sender.send(3, [4], [1], first_token=1)
        (result,) = wait_results(receiver)
        assert not result.ok and "could not land the pages" in (result.error or "")
    finally:
        receiver.close()
        sender.close()
