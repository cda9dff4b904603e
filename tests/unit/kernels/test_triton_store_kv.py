"""The Triton store kv kernel against its torch reference, under the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import pytest

from tests.unit.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.kernels.kernel_cases import STORE_CASES, StoreCase, case_id


@pytest.mark.parametrize("case", STORE_CASES, ids=case_id)
def test_matches_reference(interpreter: InterpreterWorker, case: StoreCase) -> None:
    reply = interpreter.run("store_kv", case)
    expect_pass(reply)
