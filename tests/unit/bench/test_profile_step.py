"""bench/profile_step.py: kernel names into categories, per-step arithmetic on synthetic event
lists, and a real torch.profiler recording on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import one_batch
from bench.profile_step import (
    NAME_CHARS,
    OTHER,
    TOP_KERNELS,
    KernelEvent,
    Profile,
    categorize,
    format_profile,
    has_category,
    record,
    summarize,
)
from engine.cuda_graph import GraphStepRunner
from tests.unit.engine.engine_driver import EagerCapture


@pytest.mark.parametrize(("name", "category"), [
    ("_decode_split_kernel", "attention-decode"),
    ("_decode_combine_kernel", "attention-decode"),
    ("_extend_kernel", "attention-extend"),
    ("_rotary_store_kv_kernel", "kv-store/rotary"),
    ("_store_kv_kernel", "kv-store/rotary"),
    ("_rms_norm_kernel", "norm"),
    ("_silu_and_mul_kernel", "activation"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x64_64x8_2x1_v_bz_splitK_TNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>", "gemm"),
    ("aten::addmm", "gemm"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy/memset"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ArgMaxOps<float>>>", OTHER),
])
def test_kernel_names_fall_into_their_category(name, category):
    assert categorize(name) == category


def _step(offset_us: float) -> list[KernelEvent]:
    """One synthetic step: 4 gemms of 10 µs, 2 decode-attention kernels of 5 µs, one argmax of 2
    µs, back to back from ``offset_us`` with 1 µs gaps."""
    names = ["nvjet_a", "_decode_split_kernel", "nvjet_a", "nvjet_b", "_decode_combine_kernel", "nvjet_b",
             "argmax"]
    durations = [10, 5, 10, 10, 5, 10, 2]
    events, t = [], offset_us
    for name, dur in zip(names, durations, strict=True):
        events.append(KernelEvent(name, t, t + dur, dur))
        t += dur + 1
    return events


def test_summary_is_per_step_and_against_the_wall_time():
    events = _step(1000.0) + _step(0.0)  # out of time order on purpose
    prof = summarize("decode b=1 ctx=512", "graph", events, steps=2, num_layers=2, wall_ms=0.1)
    assert prof.kernels == 7 and prof.kernels_per_layer == 3.5
    assert prof.kernel_ms == pytest.approx(0.052)
    assert prof.idle_ms == pytest.approx(0.048) and prof.idle_share == pytest.approx(0.48)
    assert prof.device_span_ms == pytest.approx(0.058)  # 52 µs of kernels + 6 gaps of 1 µs
    cats = {c.name: c for c in prof.categories}
    assert [c.name for c in prof.categories] == ["gemm", "attention-decode", OTHER]  # longest first
    assert (cats["gemm"].launches, cats["gemm"].ms, cats["gemm"].share) == (4, pytest.approx(0.04),
                                                                         pytest.approx(0.4))
    assert cats["attention-decode"].us_per_launch == pytest.approx(5.0)
    assert has_category(prof, "attention-decode") and not has_category(prof, "norm")
    assert [(k.name, k.launches, k.category) for k in prof.top[:2]] == [("nvjet_a", 2, "gemm"),
                                                                        ("nvjet_b", 2, "gemm")]
    assert prof.top[0].share == pytest.approx(0.2)


def test_top_kernels_are_capped_and_names_truncated():
    events = [KernelEvent(f"{i:03d}" + "k" * 200, i, i + 0.5, 0.5 + i) for i in range(TOP_KERNELS + 5)]
    prof = summarize("prefill 1x64", "eager", events, steps=1, num_layers=1, wall_ms=1.0)
    assert len(prof.top) == TOP_KERNELS
    assert prof.top[0].name.startswith(f"{TOP_KERNELS + 4:03d}") and len(prof.top[0].name) == NAME_CHARS


def test_span_is_unknown_when_the_steps_do_not_split_evenly():
    events = _step(0.0) + _step(100.0)[:-1]
    assert summarize("x", "eager", events, steps=2, num_layers=1, wall_ms=1.0).device_span_ms is None
    assert summarize("x", "eager", [], steps=2, num_layers=1, wall_ms=1.0).kernels == 0


def test_cpu_recording_sees_every_step_and_no_step_marker():
    torch.set_num_threads(1)
    weight, x = torch.randn(8, 8), torch.randn(2, 8)

    def step() -> float:
        with torch.profiler.record_function("an annotation"):
            return torch.nn.functional.silu(x @ weight).sum().item()

    events = record(step, steps=3, device="cpu")
    names = [e.name for e in events]
    assert names.count("aten::mm") == 3 and names.count("aten::silu") == 3
    assert not any(n.startswith("ProfilerStep") or n == "an annotation" for n in names)
    assert all(e.busy_us >= 0 and e.end_us >= e.start_us for e in events)
    prof = summarize("toy", "eager", events, steps=3, num_layers=1, wall_ms=1.0)
    text = format_profile(Profile("cpu", ["a note"], [prof]))
    assert "note: a note" in text and "toy [eager]" in text and "gemm" in text


def test_graph_replays_without_decode_attention_kernels_are_profiled_eagerly_too():
    """On CPU the "graph" steps show torch ops, no decode-attention kernel: as if the profiler had
    not seen inside the graph, so the same decode steps are profiled eagerly as well."""
    torch.set_num_threads(1)
    plan = dataclasses.replace(one_batch.TINY, warmup=0, profile_batches=(1,), profile_steps=1)
    worker = one_batch.make_worker(None, plan, "cpu")
    graphs = GraphStepRunner(worker.runner, [1, 2, 4], capture=EagerCapture())
    worker.step_runner = graphs
    prof = one_batch.profile_engine(worker, plan)
    assert worker.step_runner is graphs
    assert [(s.name, s.mode) for s in prof.steps] == [
        ("decode b=1 ctx=16", "graph"), ("decode b=1 ctx=16", "eager"), ("prefill 1x64", "eager")]
    assert len(prof.notes) == 1 and "did not see inside the graph" in prof.notes[0]


def test_copies_count_in_the_time_but_not_as_kernel_launches():
    copy = KernelEvent("Memcpy HtoD (Pinned -> Device)", 100.0, 103.0, 3.0)
    prof = summarize("decode", "graph", [*_step(0.0), copy], steps=1, num_layers=1, wall_ms=0.1)
    assert prof.kernels == 7
    assert prof.kernel_ms == pytest.approx(0.055)
