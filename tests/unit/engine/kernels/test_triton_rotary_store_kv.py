"""The fused rotary + KV store kernel against its torch reference, under the Triton interpreter
(fp32/fp16): page sizes 1 to 16 (3 and 5 too), GQA groups 1/4/8, head dims 64/80/128, one and
ragged token counts, tokens scattered over pages, qkv rows with a padded stride."""

from __future__ import annotations

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker, expect_pass
from tests.unit.engine.kernels.kernel_cases import ROTARY_STORE_CASES, RotaryStoreCase, case_id


@pytest.mark.parametrize("case", ROTARY_STORE_CASES, ids=case_id)
def test_matches_reference(interpreter: InterpreterWorker, case: RotaryStoreCase) -> None:
    reply = interpreter.run("rotary_store_kv", case)
    expect_pass(reply)
