"""1P1D on CUDA with both workers on the one GPU: greedy tokens equal the plain-torch reference
in float32, for the ``cuda_ipc`` backend (device to device into the decode pool) and for ``zmq``
(host-staged)."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.server import running_server
from tests.e2e.test_disagg import check_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FLAGS = ("--device", "cuda", "--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--max-running-requests", "48", "--max-total-tokens", "65536")


@pytest.mark.parametrize("backend", ["cuda_ipc", "zmq"])
def test_1p1d_on_one_gpu_matches_the_reference(backend: str) -> None:
    with running_server(*FLAGS, "--transfer-backend", backend, "--num-prefill", "1", "--num-decode", "1",
                        mode="pd") as server:
        check_greedy(server)
