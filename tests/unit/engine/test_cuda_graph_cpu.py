"""The CPU-testable parts of the decode CUDA graphs: batch-size bucketing, padding, and the
graph body (device-only decode inputs with padding rows) against the eager decode path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.cuda_graph import (
    PADDING_SLOT,
    EagerStepRunner,
    GraphStepRunner,
    capture_batch_sizes,
    compile_decode_variants,
    decode_forward,
    padded_batch_size,
    padded_decode_inputs,
)
from engine.worker import Worker
from launcher.flags import flag_choices
from protocol.config import ServerArgs
from protocol.messages import ExtendReq, NewReq, PageAppend, SamplingParams, StepBatch
from tests.unit.engine.engine_driver import EagerCapture, driver_for, greedy, small_args


def test_capture_batch_sizes_follow_the_list_and_end_at_the_maximum():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 12, 16, 20]
    sizes = capture_batch_sizes(160)
    assert sizes[:7] == [1, 2, 4, 8, 12, 16, 24] and sizes[-1] == 160
    assert all(b - a == 8 for a, b in zip(sizes[5:], sizes[6:], strict=False))


def test_by_default_graphs_reach_the_largest_decode_batch_the_instance_admits():
    """A decode step at full load (--max-running-requests) must not fall back to eager."""
    assert ServerArgs().graph_max_batch == ServerArgs().max_running_requests == 256
    assert ServerArgs(max_running_requests=512).graph_max_batch == 512
    assert ServerArgs(max_running_requests=512, cuda_graph_max_bs=64).graph_max_batch == 64
    with pytest.raises(ValueError, match="--cuda-graph-max-bs"):
        ServerArgs(cuda_graph_max_bs=0).validate(flag_choices())


@pytest.mark.parametrize(
    "batch,expected", [(1, 1), (3, 4), (8, 8), (9, 12), (13, 16), (17, 24), (160, 160), (161, None)]
)
def test_padded_batch_size_is_the_smallest_captured_size_that_fits(batch, expected):
    assert padded_batch_size(capture_batch_sizes(160), batch) == expected


def test_padded_inputs_put_padding_rows_after_the_real_ones():
    host = padded_decode_inputs([5, 2, 7], [10, 3, 40], 4)
    assert host.tolist() == [[5, 2, 7, PADDING_SLOT], [10, 3, 40, 0]]
    assert host.dtype == torch.int64


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit. The KV pool is ``torch.empty``: never-written pages hold garbage, NaNs
    too, and ``torch.equal`` says a NaN differs from itself."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_eager_path_is_chosen_on_cpu(embedded_worker):
    assert isinstance(embedded_worker.step_runner, EagerStepRunner)
    assert embedded_worker.pipelined is False  # a CPU step computes inside launch: the plain loop


def test_a_step_runs_in_inference_mode(embedded_worker, monkeypatch):
    """No autograd bookkeeping in the forward and the sampling (``Worker.launch``)."""
    import engine.worker

    seen = []

    def recording_sample(logits, batch):
        seen.append((torch.is_inference_mode_enabled(), logits.requires_grad))
        return real_sample(logits, batch)

    real_sample = engine.worker.sample
    monkeypatch.setattr(engine.worker, "sample", recording_sample)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    batch = StepBatch(step_id=1, new_reqs=[NewReq(slot=0, sampling=params)],
                      page_appends=[PageAppend(slot=0, pages=[1])],
                      extends=[ExtendReq(slot=0, start_pos=0, token_ids=[1, 2, 3])])
    result = embedded_worker.step(batch)
    embedded_worker.step(StepBatch(step_id=2, released=[0]))
    assert seen == [(True, False)] and len(result.token_ids) == 1


def test_compile_decode_variants_doubles_the_batch_and_writes_only_the_padding_page(embedded_worker):
    runner = embedded_worker.runner
    kernels = runner.kernels
    batches: list[int] = []
    widths: set[int] = set()

    def spy(q, k_cache, v_cache, page_table, seq_lens, sm_scale):
        batches.append(q.shape[0])
        widths.add(page_table.shape[1])
        return kernels.decode_attention(q, k_cache, v_cache, page_table, seq_lens, sm_scale)

    k_before = [k[1:].clone() for k in runner.kv_pool.k]
    runner.kernels = dataclasses.replace(kernels, decode_attention=spy)
    try:
        compile_decode_variants(runner)
    finally:
        runner.kernels = kernels
    num_layers = len(runner.kv_pool.k)
    expected = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= runner.max_slots]
    assert batches == [b for b in expected for _ in range(num_layers)]
    assert widths == {runner.max_pages_per_req}  # full-width rows, as in eager steps and graphs
    assert all(same_bits(k[1:], before) for k, before in zip(runner.kv_pool.k, k_before, strict=True))


def _prefill(worker: Worker, prompts: list[list[int]]) -> list[int]:
    """Prefill one prompt per slot (pages from 1 up); returns the decode positions."""
    page_size = worker.runner.page_size
    batch = StepBatch(step_id=0)
    next_page = 1
    for slot, prompt in enumerate(prompts):
        pages = list(range(next_page, next_page + len(prompt) // page_size + 1))  # room for one decode
        next_page += len(pages)
        batch.new_reqs.append(NewReq(slot, SamplingParams(temperature=0.0)))
        batch.page_appends.append(PageAppend(slot, pages))
        batch.extends.append(ExtendReq(slot, 0, prompt))
    worker.step(batch)
    return [len(p) for p in prompts]


def test_graph_body_with_padding_rows_matches_eager_decode_and_writes_only_page_zero(embedded_worker):
    worker = embedded_worker
    runner = worker.runner
    prompts = [[256, *range(1, n)] for n in (3, 9, 14)]
    positions = _prefill(worker, prompts)
    slots = list(range(len(prompts)))
    try:
        eager = runner.logits(runner.prepare([], slots, positions))
        before = [t.clone() for t in runner.kv_pool.k + runner.kv_pool.v]

        host = padded_decode_inputs(slots, positions, 5)
        out = decode_forward(runner, host[0], host[1])

        torch.testing.assert_close(out.logits[: len(slots)], eager, rtol=1e-5, atol=1e-4)
        assert out.meta.decode_seq_lens.tolist() == [p + 1 for p in positions] + [1, 1]
        assert out.meta.out_loc[len(slots) :].tolist() == [0, 0]
        assert not out.meta.decode_page_table[len(slots) :].any()
        for old, new in zip(before, runner.kv_pool.k + runner.kv_pool.v, strict=True):
            # the real rows rewrote their own K/V (pages never written hold uninitialized bits, NaN too)
            torch.testing.assert_close(new[1:], old[1:], equal_nan=True)
            assert same_bits(new[0, 1:], old[0, 1:]), "padding rows may write only (page 0, offset 0)"
    finally:
        worker.step(StepBatch(step_id=1, released=slots))


def test_graph_step_runner_generates_what_the_eager_runner_does(embedded_worker):
    """Decode batches shrink from 4 through padded (3) and exact sizes; greedy tokens match."""
    worker = embedded_worker
    prompts = [[256, *range(5, 5 + n)] for n in (2, 11, 6, 17)]
    sampling = [greedy(n) for n in (3, 9, 5, 7)]
    eager = [r.outputs for r in driver_for(worker).generate(prompts, sampling)]
    capture = EagerCapture()
    worker.step_runner = GraphStepRunner(worker.runner, [1, 2, 4], capture=capture)
    try:
        replayed = [r.outputs for r in driver_for(worker).generate(prompts, sampling)]
    finally:
        worker.step_runner = EagerStepRunner(worker.runner)
    assert replayed == eager
    assert {1, 2, 4} <= set(capture.replays), capture.replays


@pytest.mark.parametrize("decodes", [True, False])
def test_a_worker_that_never_decodes_warms_up_without_a_decode_step(monkeypatch, decodes):
    warm_up_steps: list[StepBatch] = []
    step = Worker.step

    def recording_step(self, batch):
        warm_up_steps.append(batch)
        return step(self, batch)

    monkeypatch.setattr(Worker, "step", recording_step)
    worker = Worker.create(small_args(), decodes=decodes)
    assert any(b.extends for b in warm_up_steps)
    assert any(b.decode_slots for b in warm_up_steps) == decodes
    assert isinstance(worker.step_runner, EagerStepRunner)  # on CPU either way
