"""The multi-node rendezvous of a tensor-parallel instance (engine/parallel/group.py): rank 0's
store listens exactly where ``--dist-init-addr`` says (not on every interface, as torch's own
would), a taken address is refused with the reason, the other ranks wait for a store that
forms a new group (not the previous incarnation's), and gloo's interface is the one owning the
route's local address."""

from __future__ import annotations

import datetime
import functools
import socket

import pytest
import torch

from engine.parallel.group import (
    FORMED_KEY,
    TensorParallel,
    interface_of_address,
    interface_towards,
    join_store,
    rank_device,
    serve_store,
)
from tests.ports import free_tcp_port

SHORT = datetime.timedelta(seconds=2)
CUDA = functools.partial(torch.device, "cuda")


def test_rank_0s_store_listens_on_the_given_address_only() -> None:
    port = free_tcp_port()
    store = serve_store("127.0.0.1", port, 2, SHORT)
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        other.bind(("127.0.0.2", port))  # refused (EADDRINUSE) if the store held every interface
    finally:
        other.close()
    store.set("k", "v")
    assert join_store("127.0.0.1", port, SHORT).get("k") == b"v"


def test_an_address_taken_or_not_on_this_host_is_refused_with_the_reason() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(ValueError, match=r"rank 0 cannot listen there \(Address already in use\)"):
            serve_store("127.0.0.1", taken.getsockname()[1], 2, SHORT)
    finally:
        taken.close()
    with pytest.raises(ValueError, match="must be an address of node 0"):
        serve_store("192.0.2.123", free_tcp_port(), 2, SHORT)  # TEST-NET-1: on no interface here


def test_a_store_whose_group_is_formed_is_not_joined() -> None:
    """The previous incarnation's rank 0 still up: a restarted rank waits for the next store."""
    port = free_tcp_port()
    store = serve_store("127.0.0.1", port, 2, SHORT)
    store.set(FORMED_KEY, "1")
    with pytest.raises(TimeoutError, match="took no new ranks"):
        join_store("127.0.0.1", port, SHORT)


def test_no_store_yet_is_waited_for_then_given_up_on() -> None:
    with pytest.raises(TimeoutError, match="rendezvous at 127.0.0.1:"):
        join_store("127.0.0.1", free_tcp_port(), SHORT)


def test_gloo_interface_is_the_one_owning_the_routes_local_address() -> None:
    loopback = interface_of_address("127.0.0.1")
    assert loopback is not None
    assert interface_towards("127.0.0.1", 29500) == loopback
    assert interface_of_address("192.0.2.123") is None
    assert interface_of_address("::1") in (loopback, None)  # None: IPv6 disabled here


def test_a_cuda_rank_takes_the_device_of_its_index_on_its_host() -> None:
    """Node 1 of ``--tp-size 4 --nnodes 2`` runs ranks 2 and 3: on ``cuda:0`` and ``cuda:1`` (no
    device is touched: only the choice)."""
    ranks = [TensorParallel(size=4, rank=r, local_size=2) for r in (2, 3)]
    assert [tp.local_rank for tp in ranks] == [0, 1]
    assert [rank_device(torch.device("cuda"), tp) for tp in ranks] == list(map(CUDA, (0, 1)))
    assert rank_device(torch.device("cpu"), ranks[1]) == torch.device("cpu")
