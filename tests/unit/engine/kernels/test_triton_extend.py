"""The Triton extend kernel against its torch reference, under the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.engine.kernels.kernel_cases import EXTEND_CASES, ExtendCase, case_id


@pytest.mark.parametrize("case", EXTEND_CASES, ids=case_id)
def test_matches_reference(interpreter: InterpreterWorker, case: ExtendCase) -> None:
    reply = interpreter.run("extend", case)
    expect_pass(reply)
