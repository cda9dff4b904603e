"""The worker's step faults of ``PDSERVE_FAULTS``: wired in once, each misbehaving once."""

from __future__ import annotations

import time

import pytest

from engine.faults import FaultyStep, InjectedFault, with_step_faults
from protocol.faults import Faults
from protocol.messages import StepBatch, StepResult


def answer(batch: StepBatch) -> StepResult:
    return StepResult(step_id=batch.step_id, slots=[], token_ids=[])


def test_no_step_fault_leaves_the_step_function_alone() -> None:
    assert with_step_faults(answer, Faults()) is answer
    assert with_step_faults(answer, Faults(step_delay_at_step=3)) is answer  # no delay asked for


def test_the_delay_comes_once_at_the_first_step_from_its_number() -> None:
    step = with_step_faults(answer, Faults(step_delay_s=0.3, step_delay_at_step=2))
    assert isinstance(step, FaultyStep)
    durations = []
    for step_id in (0, 1, 3, 4):
        start = time.monotonic()
        assert step(StepBatch(step_id=step_id)).step_id == step_id
        durations.append(time.monotonic() - start)
    assert durations[2] >= 0.3 and max(durations[:2] + durations[3:]) < 0.2


def test_the_forward_error_is_raised_once_at_its_step() -> None:
    step = with_step_faults(answer, Faults(forward_error_at_step=1))
    assert step(StepBatch(step_id=0)).step_id == 0
    with pytest.raises(InjectedFault, match="forward_error_at_step"):
        step(StepBatch(step_id=1))
    assert step(StepBatch(step_id=2)).step_id == 2
