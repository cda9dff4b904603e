"""A minimal scheduler stand-in that drives an engine ``Worker`` with ``StepBatch`` deltas:
slots, a page free list, chunked prefill (several requests at once), decodes, and the
overlap schedule's one-step lag (a step's result is read only after the next step was sent,
so decodes rely on the worker's future-token map, and a finished request decodes once more
before it is released; that extra token is discarded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.cuda_graph import CapturedDecode, decode_forward
from engine.runner import ModelRunner
from engine.worker import Worker
from protocol.config import ServerArgs
from protocol.messages import ExtendReq, NewReq, PageAppend, SamplingParams, StepBatch, StepResult


@dataclass
class DriverReq:
    prompt: list[int]
    sampling: SamplingParams
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens scheduled
    decodes: int = 0  # decode steps scheduled
    outputs: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    released: bool = False

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.prompt)


class StepDriver:
    def __init__(
        self,
        step: Callable[[StepBatch], StepResult],
        num_pages: int,
        page_size: int,
        max_running: int,
        chunk_size: int,
        overlap: bool = True,
    ) -> None:
        self.step = step
        self.page_size = page_size
        self.free_pages = list(range(num_pages - 1, 0, -1))  # page 0 is the padding page
        self.free_slots = list(range(max_running + 2))
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.overlap = overlap
        self.step_id = 0
        self.results: list[StepResult] = []
        self.discarded = 0  # tokens sampled after their request had finished

    def generate(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> list[DriverReq]:
        reqs = [DriverReq(list(p), s) for p, s in zip(prompts, sampling, strict=True)]
        waiting, running = list(reqs), []
        pending: tuple[StepResult, dict[int, DriverReq]] | None = None
        for _ in range(10_000):
            if not waiting and all(r.released for r in running):
                if pending is not None:
                    self._process(*pending)
                return reqs
            batch = self._form_step(waiting, running)
            owners = {r.slot: r for r in running if not r.released}  # slots are reused later
            result = self.step(batch)
            self.results.append(result)
            if pending is not None:
                self._process(*pending)
            pending = (result, owners)
            if not self.overlap:
                self._process(*pending)
                pending = None
        raise AssertionError("driver did not finish")

    def _form_step(self, waiting: list[DriverReq], running: list[DriverReq]) -> StepBatch:
        batch = StepBatch(step_id=self.step_id)
        self.step_id += 1
        for req in running:
            if req.finished and not req.released:
                batch.released.append(req.slot)
                self.free_slots.append(req.slot)
                self.free_pages.extend(req.pages)
                req.released = True
        while waiting and sum(not r.released for r in running) < self.max_running:
            req = waiting.pop(0)
            req.slot = self.free_slots.pop(0)
            batch.new_reqs.append(NewReq(req.slot, req.sampling, prompt_ids=list(req.prompt)))
            running.append(req)
        for req in running:
            if req.finished:
                continue
            if not req.prefill_done:
                chunk = req.prompt[req.prefilled : req.prefilled + self.chunk_size]
                self._reserve(req, req.prefilled + len(chunk), batch)
                done = req.prefilled + len(chunk) == len(req.prompt)
                batch.extends.append(ExtendReq(req.slot, req.prefilled, chunk, sample=done))
                req.prefilled += len(chunk)
            elif req.decodes < req.sampling.max_new_tokens:
                position = len(req.prompt) + req.decodes
                self._reserve(req, position + 1, batch)
                batch.decode_slots.append(req.slot)
                batch.decode_positions.append(position)
                req.decodes += 1
        return batch

    def _reserve(self, req: DriverReq, num_tokens: int, batch: StepBatch) -> None:
        needed = -(-num_tokens // self.page_size) - len(req.pages)
        if needed > 0:
            pages = [self.free_pages.pop() for _ in range(needed)]
            req.pages.extend(pages)
            batch.page_appends.append(PageAppend(req.slot, pages))

    def _process(self, result: StepResult, owners: dict[int, DriverReq]) -> None:
        for i, (slot, token) in enumerate(zip(result.slots, result.token_ids, strict=True)):
            req = owners[slot]
            if req.finished:
                self.discarded += 1  # the overlap schedule's extra token
                continue
            req.outputs.append(token)
            if result.logprobs is not None:
                req.logprobs.append(result.logprobs[i])
            stop = token in req.sampling.stop_token_ids
            req.finished = stop or len(req.outputs) >= req.sampling.max_new_tokens


def small_args(**overrides: object) -> ServerArgs:
    """A small CPU worker: float32, torch attention, a 1024-token pool of 4-token pages."""
    args = dict(
        device="cpu",
        attention_backend="torch",
        page_size=4,
        max_total_tokens=1024,
        max_running_requests=4,
        chunked_prefill_size=16,
    )
    args.update(overrides)
    return ServerArgs(**args)  # type: ignore[arg-type]


def driver_for(worker: Worker, chunk_size: int = 7, overlap: bool = True, max_running: int = 4) -> StepDriver:
    """A driver over ``worker.step``; 7-token chunks cross 4-token page boundaries unevenly."""
    return StepDriver(
        worker.step, worker.num_pages, worker.runner.page_size, max_running, chunk_size, overlap=overlap
    )


def greedy(max_new_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


class EagerCapture:
    """The CPU stand-in for CUDA-graph capture (``GraphStepRunner(capture=...)``): ``replay``
    re-runs the graph body on the static input buffer and copies the results into the first
    run's output tensors, as a graph does. ``replays`` records the batch size of every replay."""

    def __init__(self) -> None:
        self.replays: list[int] = []

    def __call__(self, runner: ModelRunner, inputs: torch.Tensor, batch_sizes: list[int]) -> dict:
        return {bs: self._capture(runner, inputs[:, :bs]) for bs in batch_sizes}

    def _capture(self, runner: ModelRunner, inputs: torch.Tensor) -> CapturedDecode:
        slots, positions = inputs
        outputs = decode_forward(runner, slots, positions)

        def replay() -> None:
            self.replays.append(len(slots))
            fresh = decode_forward(runner, slots, positions)
            outputs.input_ids.copy_(fresh.input_ids)
            outputs.logits.copy_(fresh.logits)

        return CapturedDecode(replay, outputs)
