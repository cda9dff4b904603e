"""The faults of ``protocol.faults`` that a unified instance's worker honours, wired in once at
start-up (``with_step_faults``): a hung worker and a forward-pass exception."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol.faults import FAULTS_ENV, Faults
from protocol.messages import StepBatch

logger = logging.getLogger("pdserve.worker")

R = TypeVar("R")  # what the step function returns: a StepResult, or a LaunchedStep


class InjectedFault(RuntimeError):
    """The forward-pass exception asked for by ``forward_error_at_step`` (protocol/faults.py)."""


@dataclass
class FaultyStep(Generic[R]):
    """A step function that misbehaves once as ``PDSERVE_FAULTS`` asks: sleeps ``delay_s`` before
    the first step numbered at least ``delay_at`` (a hung worker), raises in the first one
    numbered at least ``error_at`` (a forward-pass exception). None: done, or not asked for."""

    step: Callable[[StepBatch], R]
    delay_s: float
    delay_at: int | None
    error_at: int | None

    def __call__(self, batch: StepBatch) -> R:
        if self.delay_at is not None and batch.step_id >= self.delay_at:
            self.delay_at = None
            logger.warning("step %d: sleeping %g s (%s)", batch.step_id, self.delay_s, FAULTS_ENV)
            time.sleep(self.delay_s)
        if self.error_at is not None and batch.step_id >= self.error_at:
            self.error_at = None
            raise InjectedFault(f"forward_error_at_step={batch.step_id} ({FAULTS_ENV})")
        return self.step(batch)


def with_step_faults(step: Callable[[StepBatch], R], faults: Faults) -> Callable[[StepBatch], R]:
    """``step``, wrapped for the step faults asked for (itself when none is, so that the step
    loop checks nothing)."""
    delay_at = faults.step_delay_at_step if faults.step_delay_s > 0 else None
    if delay_at is None and faults.forward_error_at_step is None:
        return step
    logger.warning("step faults injected (%s): %s", FAULTS_ENV, faults.to_setting())
    return FaultyStep(step, faults.step_delay_s, delay_at, faults.forward_error_at_step)
