"""Small KV pools and connected (sender, receiver) pairs for the backend tests."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
import torch

from kvtransfer import KVLayout, KVReceiver, KVSender, RoomResult, TransferConfig, TransferState, make_backend
from kvtransfer.nixl_agent import nixl_available
from tests import REPO_ROOT

NUM_LAYERS, NUM_PAGES, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM = 2, 16, 4, 2, 8
FAST = TransferConfig.uniform(5.0, heartbeat_interval=0.05, heartbeat_timeout=1.0)
NEEDS_NIXL = pytest.mark.skipif(
    not nixl_available(), reason="the nixl backend needs the nixl-cu12 package: pip install 'pdserve[nixl]'"
)
CPU_BACKENDS = ("zmq", "fake", pytest.param("nixl", marks=NEEDS_NIXL))
Pool = tuple[list[torch.Tensor], list[torch.Tensor]]  # per-layer k caches, v caches


def layout(backend: str, **overrides: object) -> KVLayout:
    fields = dict(
        model="tiny", num_layers=NUM_LAYERS, page_size=PAGE_SIZE, num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, dtype="float32", backend=backend,
    )
    fields.update(overrides)
    return KVLayout(**fields)  # type: ignore[arg-type]


def pool(seed: int | None = None, head_dim: int = HEAD_DIM) -> Pool:
    """Per-layer k and v caches: random with ``seed``, zeros without."""
    shape = (NUM_PAGES, PAGE_SIZE, NUM_KV_HEADS, head_dim)
    if seed is None:
        zeros = [torch.zeros(shape) for _ in range(2 * NUM_LAYERS)]
        return zeros[:NUM_LAYERS], zeros[NUM_LAYERS:]
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(shape, generator=g) for _ in range(NUM_LAYERS)],
        [torch.randn(shape, generator=g) for _ in range(NUM_LAYERS)],
    )


def address(backend: str) -> str:
    return f"fake://prefill-{uuid.uuid4().hex[:8]}" if backend == "fake" else "tcp://127.0.0.1:*"


def pages_equal(src: Pool, src_pages: list[int], dst: Pool, dst_pages: list[int]) -> bool:
    return all(
        torch.equal(d[dst_pages], s[src_pages])
        for s_caches, d_caches in zip(src, dst, strict=True)
        for s, d in zip(s_caches, d_caches, strict=True)
    )


def wait_results(side: KVSender | KVReceiver, count: int = 1, timeout: float = 5.0) -> list[RoomResult]:
    """Poll until ``count`` results arrived (bounded; each poll waits on a condition)."""
    results: list[RoomResult] = []
    end = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < end:
        results += side.poll(timeout=end - time.monotonic())
    return results


def wait_state(side: KVSender | KVReceiver, room: int, state: TransferState, timeout: float = 5.0) -> None:
    """Wait until the I/O thread has moved ``room`` to ``state`` (no event exists for that)."""
    end = time.monotonic() + timeout
    while side.state(room) != state:
        assert time.monotonic() < end, f"room {room} is {side.state(room)!r}, not {state!r}"
        time.sleep(0.005)


@dataclass
class Pair:
    backend: str
    sender: KVSender
    receiver: KVReceiver
    peer: str
    src: Pool
    dst: Pool

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


def connect(backend: str, config: TransferConfig = FAST) -> Pair:
    src, dst = pool(seed=0), pool()
    sender = make_backend(backend, "prefill", layout(backend), *src, address=address(backend), config=config)
    receiver = make_backend(backend, "decode", layout(backend), *dst, config=config)
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    peer = receiver.register(sender.address, timeout=5.0)
    return Pair(backend, sender, receiver, peer, src, dst)


def prefill_child(backend: str) -> str:
    """A prefill side in a process of its own (``python -c``, the address as its argument): one
    room of two sends, then it prints the room's final state."""
    return f"""
import sys
import torch
torch.set_num_threads(1)
from kvtransfer import make_backend
from tests.unit.kvtransfer.kv_helpers import FAST, layout, pool
sender = make_backend({backend!r}, "prefill", layout({backend!r}), *pool(seed=0), address=sys.argv[1],
                      config=FAST)
sender.add_room(5)
sender.send(5, [1, 2, 3], [10, 11, 12])
sender.send(5, [4, 5], [13, 14], first_token=77)
results = []
while not results:
    results = sender.poll(timeout=30)
print(results[0].state.name, flush=True)
sender.close()
"""


def spawn_child(script: str, arg: str) -> subprocess.Popen:
    """``script`` (one of the ``*_CHILD`` programs) in a process of its own, ``arg`` its argument,
    its stdout readable as text."""
    return subprocess.Popen(
        [sys.executable, "-c", script, arg], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )


def stop_child(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
