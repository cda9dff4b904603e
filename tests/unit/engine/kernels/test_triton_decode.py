"""The Triton decode kernel against its torch reference, under the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.engine.kernels.kernel_cases import DECODE_CASES, DecodeCase, case_id


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_matches_reference(interpreter: InterpreterWorker, case: DecodeCase) -> None:
    reply = interpreter.run("decode", case)
    expect_pass(reply)
