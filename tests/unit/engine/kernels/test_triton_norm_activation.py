"""The fused RMSNorm(+residual) and SiLU-and-mul kernels against their torch references,
under the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.engine.kernels.kernel_cases import (
    ACTIVATION_CASES,
    NORM_CASES,
    ActivationCase,
    NormCase,
    case_id,
)


@pytest.mark.parametrize("case", NORM_CASES, ids=case_id)
def test_rms_norm_matches_reference(interpreter: InterpreterWorker, case: NormCase) -> None:
    reply = interpreter.run("rms_norm", case)
    expect_pass(reply)


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_silu_and_mul_matches_reference(interpreter: InterpreterWorker, case: ActivationCase) -> None:
    reply = interpreter.run("silu_and_mul", case)
    expect_pass(reply)
