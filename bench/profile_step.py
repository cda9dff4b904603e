"""What fills a step: ``torch.profiler`` over a few identical steps, its kernels sorted into
categories by name, next to the step's wall time.

On CUDA the events are the device's kernels and copies (CUPTI reports the kernels a CUDA graph
launches as individual kernel records, with their graph ids, so a replayed decode step shows
every kernel of the model). On CPU, where there are no kernels, the events are torch's CPU ops
with their self time: the numbers mean nothing, but the code path runs in CI.

Per category: launches per step, device ms per step, share of the step's wall time, µs per
launch. Per step: kernels, kernels per layer, the sum of kernel time against the wall time
(measured without the profiler, whose tracing slows the host), the gap between them (host
work, launches and idle device), and the device's span from its first kernel to its last.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

COPIES = "memcpy/memset"  # counted in a step's time, not as kernel launches
OTHER = "other"

# Category → lowercase substrings of kernel (or CPU op) names; the first category that matches
# wins, so the specific ones come before the broad ones. Everything else is "other".
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention-decode", ("_decode_split_kernel", "_decode_combine_kernel")),
    ("attention-extend", ("_extend_kernel",)),
    ("kv-store/rotary", ("store_kv", "rotary")),  # _rotary_store_kv_kernel, _store_kv_kernel
    ("norm", ("_rms_norm_kernel", "rms_norm")),
    ("activation", ("_silu_and_mul_kernel", "silu")),
    ("gemm", ("gemm", "gemv", "cublas", "cutlass", "xmma", "nvjet", "splitkreduce",
              "aten::mm", "aten::addmm", "aten::bmm", "_linear_pointwise")),  # the last: CPU, packed
    (COPIES, ("memcpy", "memset")),
)
TOP_KERNELS = 10
NAME_CHARS = 80


@dataclass(frozen=True)
class KernelEvent:
    name: str
    start_us: float
    end_us: float
    busy_us: float  # the kernel's duration; a CPU op's self time


@dataclass
class Category:
    name: str
    launches: float  # per step
    ms: float  # per step
    share: float  # of the step's wall time
    us_per_launch: float


@dataclass
class TopKernel:
    name: str  # truncated to NAME_CHARS
    category: str
    launches: float  # per step
    ms: float  # per step
    share: float  # of the step's wall time


@dataclass
class StepProfile:
    name: str  # e.g. "decode b=1 ctx=512"
    mode: str  # "graph": CUDA-graph replay, as served; "eager": every kernel launched from Python
    profiled_steps: int
    wall_ms: float  # median step, without the profiler
    kernel_ms: float  # sum of the kernels' time per step
    idle_ms: float  # wall_ms - kernel_ms: host work, launches, the device waiting
    idle_share: float  # idle_ms / wall_ms
    device_span_ms: float | None  # first kernel start to last end, under the profiler (None: unknown)
    kernels: float  # per step, copies and memsets not counted
    kernels_per_layer: float
    categories: list[Category] = field(default_factory=list)  # by time, longest first
    top: list[TopKernel] = field(default_factory=list)


@dataclass
class Profile:
    activity: str  # "cuda": device kernels; "cpu": CPU ops (a smoke test)
    notes: list[str] = field(default_factory=list)
    steps: list[StepProfile] = field(default_factory=list)


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return OTHER


def has_category(step: StepProfile, category: str) -> bool:
    return any(c.name == category for c in step.categories)


def summarize(name: str, mode: str, events: Sequence[KernelEvent], steps: int, num_layers: int,
              wall_ms: float) -> StepProfile:
    """The breakdown of ``steps`` identical steps whose events are ``events``, per step."""
    step_ms = lambda us: us / steps / 1e3  # total µs over all steps → ms per step
    kernel_ms = step_ms(sum(e.busy_us for e in events))
    categories = [
        Category(cat, n / steps, step_ms(us), step_ms(us) / wall_ms, us / n)
        for cat, (n, us) in _tally(events, lambda e: categorize(e.name)).items()
    ]
    categories.sort(key=lambda c: -c.ms)
    by_name = sorted(_tally(events, lambda e: e.name).items(), key=lambda item: -item[1][1])
    kernels = sum(categorize(e.name) != COPIES for e in events) / steps  # launches, not copies
    return StepProfile(
        name=name, mode=mode, profiled_steps=steps, wall_ms=wall_ms, kernel_ms=kernel_ms,
        idle_ms=wall_ms - kernel_ms, idle_share=(wall_ms - kernel_ms) / wall_ms,
        device_span_ms=_mean_span_ms(events, steps), kernels=kernels,
        kernels_per_layer=kernels / num_layers, categories=categories,
        top=[TopKernel(k[:NAME_CHARS], categorize(k), n / steps, step_ms(us), step_ms(us) / wall_ms)
             for k, (n, us) in by_name[:TOP_KERNELS]],
    )


def _tally(events: Sequence[KernelEvent], key: Callable[[KernelEvent], str]) -> dict[str, tuple[int, float]]:
    """key → (events, their busy µs)."""
    tally: dict[str, tuple[int, float]] = defaultdict(lambda: (0, 0.0))
    for e in events:
        n, us = tally[key(e)]
        tally[key(e)] = (n + 1, us + e.busy_us)
    return tally


def _mean_span_ms(events: Sequence[KernelEvent], steps: int) -> float | None:
    """Mean first-start-to-last-end of each step, the steps being equal runs of the events in
    time order (identical steps launch identical kernels); None when the count does not split."""
    if not events or len(events) % steps:
        return None
    ordered = sorted(events, key=lambda e: e.start_us)
    size = len(ordered) // steps
    chunks = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    return statistics.fmean(max(e.end_us for e in c) - c[0].start_us for c in chunks) / 1e3


# ----------------------------------------------------------------------------- recording


def record(fn: Callable[[], object], steps: int, device: str) -> list[KernelEvent]:
    """The events of ``steps`` calls of ``fn`` (each ending with a host sync), after one call
    the profiler skips and one it warms up on."""
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity], schedule=schedule(wait=1, warmup=1, active=steps)) as prof:
        for _ in range(2 + steps):
            fn()
            prof.step()
    # record_function ranges (ProfilerStep#, and on CUDA their shadows on the device's
    # timeline) are user annotations, not work
    events = [e for e in prof.events() if not e.is_user_annotation]
    if device == "cuda":
        return [
            KernelEvent(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us())
            for e in events if e.device_type == DeviceType.CUDA
        ]
    return [KernelEvent(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total)
            for e in events if e.device_type == DeviceType.CPU]


def wall_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall milliseconds of ``fn``, which must end with a host sync."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def profile_step(name: str, mode: str, fn: Callable[[], object], *, steps: int, warmup: int,
                 num_layers: int, device: str) -> StepProfile:
    """Time ``fn`` without the profiler, then profile ``steps`` calls of it."""
    wall = wall_ms(fn, warmup, steps)
    return summarize(name, mode, record(fn, steps, device), steps, num_layers, wall)


# ----------------------------------------------------------------------------- printing


def format_profile(prof: Profile) -> str:
    unit = "CUDA kernels" if prof.activity == "cuda" else "CPU ops (self time; a smoke test)"
    out = [f"profile: {unit} per step; wall = the step's median without the profiler"]
    out += [f"note: {note}" for note in prof.notes]
    for s in prof.steps:
        span = f", device span {s.device_span_ms:.3f} ms" if s.device_span_ms is not None else ""
        out.append(
            f"{s.name} [{s.mode}]: wall {s.wall_ms:.3f} ms = kernels {s.kernel_ms:.3f} ms "
            f"+ idle {s.idle_ms:.3f} ms ({s.idle_share:.0%}){span}; "
            f"{s.kernels:.0f} kernels, {s.kernels_per_layer:.1f} per layer"
        )
        out.append(f"  {'category':18} {'launches':>8} {'ms':>9} {'of step':>7} {'us/launch':>9}")
        out += [f"  {c.name:18} {c.launches:8.1f} {c.ms:9.3f} {c.share:7.1%} {c.us_per_launch:9.1f}"
                for c in s.categories]
        out += [f"  top {k.ms:9.3f} ms {k.share:6.1%} x{k.launches:<6.0f} {k.name[:60]}" for k in s.top]
    return "\n".join(out)
