"""KV transfer on CUDA: the gather / scatter / copy kernels compiled for real, the zmq backend on
device pools, the cuda_ipc backend between two processes (transfer, and a decode-side abort
that is reported only once the prefill process acknowledges it), and nixl head slices between
device pools of instances of different ``--tp-size``s (VRAM registered; one GPU suffices)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtransfer import KVLayout, TransferConfig, TransferState, make_backend
from tests import REPO_ROOT
from tests.unit.kvtransfer.kernel_checks import CASES, KernelCase, check
from tests.unit.kvtransfer.kv_helpers import NEEDS_NIXL, pages_equal, wait_results, wait_state
from tests.unit.kvtransfer.test_tp_slices import check_sliced_writes, deployed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LAYERS, PAGES, PAGE_SIZE, HEADS, DIM = 4, 64, 16, 8, 128
CONFIG = TransferConfig.uniform(30.0, heartbeat_interval=0.1, heartbeat_timeout=30.0)
LARGE_CASES = [
    KernelCase("bfloat16", 32, 16, 8, 128, 260, 256, True, seed=1),  # Llama-3-8B, 4096 tokens
    KernelCase("float16", 4, 1, 8, 64, 300, 200, False, seed=2),
]


@pytest.mark.parametrize("case", [*CASES, *LARGE_CASES], ids=lambda c: c.id)
def test_kernels_match_reference_on_cuda(case: KernelCase) -> None:
    check(case, device="cuda")


def layout(backend: str) -> KVLayout:
    return KVLayout("gpu-test", LAYERS, PAGE_SIZE, HEADS, DIM, "bfloat16", backend)


def cuda_pool(seed: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (2 * LAYERS, PAGES, PAGE_SIZE, HEADS, DIM)
    if seed is None:
        data = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    else:
        g = torch.Generator(device="cuda").manual_seed(seed)
        data = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    arrays = list(data.unbind(0))
    return arrays[0::2], arrays[1::2]


def test_zmq_backend_moves_device_pages() -> None:
    src, dst = cuda_pool(0), cuda_pool(None)
    sender = make_backend("zmq", "prefill", layout("zmq"), *src, address="tcp://127.0.0.1:*", config=CONFIG)
    receiver = make_backend("zmq", "decode", layout("zmq"), *dst, config=CONFIG)
    try:
        receiver.expect(1, receiver.register(sender.address), [40, 7, 33, 9])
        sender.add_room(1)
        sender.send(1, [3, 5], [40, 7])
        sender.send(1, [60, 2], [33, 9], first_token=11)
        (done,) = wait_results(receiver, timeout=30.0)
        assert done.ok and done.first_token == 11
        assert pages_equal(src, [3, 5, 60, 2], dst, [40, 7, 33, 9])
        assert wait_results(sender, timeout=30.0)[0].ok
    finally:
        receiver.close()
        sender.close()


PREFILL_CHILD = """
import sys
import torch
from kvtransfer import TransferState, make_backend
from tests.gpu.test_kvtransfer_gpu import CONFIG, cuda_pool, layout
from tests.unit.kvtransfer.kv_helpers import wait_results, wait_state

sender = make_backend(
    "cuda_ipc", "prefill", layout("cuda_ipc"), *cuda_pool(0), address=sys.argv[1], config=CONFIG
)
sender.add_room(5)
sender.send(5, [1, 2, 3], [10, 11, 12])
sender.send(5, [4, 5], [13, 14], first_token=77)
print("room5", wait_results(sender, timeout=60)[0].state.name, flush=True)
sender.add_room(6)
wait_state(sender, 6, TransferState.WAITING_FOR_INPUT, timeout=60)
sender.send(6, [7], [20])
print("room6", wait_results(sender, timeout=60)[0].state.name, flush=True)
sender.close()
"""


def test_cuda_ipc_between_two_processes(tmp_path: Path) -> None:
    addr = f"ipc://{tmp_path}/kv.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", PREFILL_CHILD, addr], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    dst = cuda_pool(None)
    receiver = make_backend("cuda_ipc", "decode", layout("cuda_ipc"), *dst, config=CONFIG)
    try:
        peer = receiver.register(addr, timeout=120.0)
        receiver.expect(5, peer, [10, 11, 12, 13, 14])
        (done,) = wait_results(receiver, timeout=60.0)
        assert done.ok and done.first_token == 77
        assert pages_equal(cuda_pool(0), [1, 2, 3, 4, 5], dst, [10, 11, 12, 13, 14])

        receiver.expect(6, peer, [20, 21])
        wait_state(receiver, 6, TransferState.TRANSFERRING, timeout=60.0)
        receiver.abort(6, "client left")
        # Reported after the prefill process's ABORT_ACK, well before its heartbeat timeout.
        (failed,) = wait_results(receiver, timeout=10.0)
        assert failed.state == TransferState.FAILED and "client left" in (failed.error or "")

        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        assert out.split() == ["room5", "DONE", "room6", "FAILED"]
    finally:
        receiver.close()
        if child.poll() is None:
            child.kill()
            child.wait()


@NEEDS_NIXL
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2)])
def test_nixl_head_slices_between_device_pools(prefill_tp: int, decode_tp: int) -> None:
    with deployed(prefill_tp, decode_tp, device="cuda") as (prefill, decode):
        check_sliced_writes(prefill, decode)
