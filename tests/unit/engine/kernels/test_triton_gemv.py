"""The small-batch GEMV (decode matmuls) against ``F.linear`` in float32, under the Triton
interpreter (fp32/fp16): every config of ``GEMV_CONFIGS``, M in {1, 3, 8, 16}, odd N and K,
with and without bias, strided rows of x."""

from __future__ import annotations

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.engine.kernels.kernel_cases import GEMV_CASES, GemvCase, case_id


@pytest.mark.parametrize("case", GEMV_CASES, ids=case_id)
def test_gemv_matches_linear(interpreter: InterpreterWorker, case: GemvCase) -> None:
    reply = interpreter.run("gemv", case)
    expect_pass(reply)
