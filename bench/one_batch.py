"""One batch through the engine alone (no processes): prefill and decode step times of a
Llama-3-8B-shaped model with random weights, against the hardware and against transformers.

- ours: ``Worker.step`` exactly as the server calls it (host inputs, CUDA-graph replay for
  decode, sampling, the host sync of the sampled tokens): prefill 1x512 and 1x4096; decode at
  batch 1, 32 and 128 with context 512 and 2048;
- ceilings, measured in the same run: a large device-to-device copy (GB/s), a large bf16 matmul
  (TFLOP/s), and the decode step's matmuls alone (every projection and the lm_head, through
  cuBLAS, in one CUDA graph);
- the peer: Hugging Face transformers' forward on the same shape with random weights (decode
  step at batch 1 and 128 with context 512 over its KV cache, prefill 1x4096).

Each row: ms per step, tokens/s, the roofline (bytes that must move / measured bandwidth, or
FLOPs / measured matmul rate, whichever is longer) and our fraction of it, the ratio to the
matmuls alone and to transformers, and the issue's H100 target where there is one.

Then what the profile says is in the way (``bench/profile_step.py``; ``--no-profile`` skips it):
``torch.profiler`` over decode steps at batch 1 and 128, context 512, as served (graph replay
included), and over prefill 1x4096: kernels per step and per layer, device time per category
(gemm, attention, KV store, norm, activation, copies, other), the top kernels, and the sum of
kernel time against the step's wall time. In the JSON under "profile".

``python -m bench.one_batch --output bench/results/one_batch.json``       (GPU)
``python -m bench.one_batch --tiny --output /tmp/one_batch.json``         (CPU smoke test)

``--tiny`` runs the embedded model on CPU at tiny shapes so the script cannot rot: its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import one_batch_peers as peers
from bench.kernels import FULL_SHAPES, TINY_SHAPES, make_timer, measure_ceilings
from bench.kernels_base import write_report
from bench.profile_step import Profile, StepProfile, format_profile, has_category, profile_step, wall_ms
from engine.cuda_graph import EagerStepRunner
from engine.kv_pool import kv_bytes_per_token
from engine.worker import Worker
from protocol.config import EMBEDDED, ServerArgs
from protocol.messages import ExtendReq, NewReq, PageAppend, SamplingParams, StepBatch

DEFAULT_MODEL = Path(__file__).resolve().parent / "model_configs" / "llama-3-8b"
PAGE_SIZE = 16


@dataclass(frozen=True)
class Plan:
    dtype: str
    prefill_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    peer_decode_batches: tuple[int, ...]
    peer_decode_context: int
    peer_prefill_len: int
    warmup: int
    reps: int
    profile_batches: tuple[int, ...]  # decode steps profiled at profile_context
    profile_context: int
    profile_prefill_len: int
    profile_steps: int


FULL = Plan("bfloat16", (512, 4096), (1, 32, 128), (512, 2048), (1, 128), 512, 4096, warmup=3, reps=20,
            profile_batches=(1, 128), profile_context=512, profile_prefill_len=4096, profile_steps=5)
TINY = Plan("float32", (16, 64), (1, 4), (16, 40), (1, 4), 16, 64, warmup=1, reps=3,
            profile_batches=(1, 4), profile_context=16, profile_prefill_len=64, profile_steps=2)

# The issue's H100 targets: (phase, batch, context) → max ms, and max ratio to the matmuls alone.
TARGET_MS = {("decode", 1, 512): 6.0, ("decode", 128, 512): 10.0, ("prefill", 1, 4096): 110.0}
TARGET_VS_MATMULS = {("decode", 1, 512): 1.05}


@dataclass
class Row:
    phase: str  # "prefill" | "decode"
    batch: int
    context: int  # tokens in each sequence after the step
    ms: float
    tokens_per_s: float
    roofline_ms: float
    roofline_bound: str  # "memory" | "compute"
    roofline_fraction: float  # roofline_ms / ms (1.0: at the speed of the hardware)
    forward_ms: float | None = None  # decode: the step runner alone (graph replay), no sampling
    matmuls_ms: float | None = None  # decode: the step's matmuls alone
    vs_matmuls: float | None = None  # ms / matmuls_ms
    hf_ms: float | None = None
    vs_hf: float | None = None  # hf_ms / ms (>1: faster than transformers)
    target_ms: float | None = None
    target_vs_matmuls: float | None = None

    @property
    def name(self) -> str:
        return step_name(self.phase, self.batch, self.context)


def step_name(phase: str, batch: int, context: int) -> str:
    return f"prefill 1x{context}" if phase == "prefill" else f"decode b={batch} ctx={context}"


@dataclass
class Report:
    device: str
    meaningful: bool
    model: str
    dtype: str
    torch_version: str
    ceilings: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    profile: Profile | None = None  # what fills the profiled steps (bench/profile_step.py)
    # the worker's start-up measurement of cuBLAS against our GEMV (engine.kernels.small_batch_linear)
    small_batch_matmuls: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- our engine


def make_worker(model_path: str | None, plan: Plan, device: str) -> Worker:
    max_batch = max(plan.decode_batches)
    tokens = max(max_batch * (max(plan.decode_contexts) + PAGE_SIZE), max(plan.prefill_lens) + PAGE_SIZE)
    args = ServerArgs(
        model_path=model_path or EMBEDDED.name, load_format="dummy" if model_path else "auto",
        dtype=plan.dtype, device=device, page_size=PAGE_SIZE, max_total_tokens=tokens,
        max_running_requests=max_batch, cuda_graph_max_bs=max_batch,
    )
    worker = Worker.create(args)
    for cache in worker.runner.kv_pool.k + worker.runner.kv_pool.v:
        cache.normal_()  # finite values everywhere (the pool starts uninitialized)
    return worker


class StepBench:
    """Sets up slots with scattered pages and times ``Worker.step`` on them."""

    def __init__(self, worker: Worker, plan: Plan) -> None:
        self.worker = worker
        self.plan = plan
        gen = torch.Generator().manual_seed(0)
        self.free_pages = (torch.randperm(worker.num_pages - 1, generator=gen) + 1).tolist()
        self.step_id = 0

    def _step(self, batch: StepBatch) -> None:
        batch.step_id = self.step_id
        self.step_id += 1
        self.worker.step(batch)

    def _open(self, batch: int, context: int) -> tuple[list[int], list[int]]:
        """Slots 0..batch-1, each with the pages of ``context`` tokens: (slots, pages)."""
        per_slot = -(-context // PAGE_SIZE)
        pages, self.free_pages = self.free_pages[: batch * per_slot], self.free_pages[batch * per_slot :]
        slots = list(range(batch))
        greedy = SamplingParams(temperature=0.0)
        self._step(StepBatch(
            step_id=0, new_reqs=[NewReq(s, greedy) for s in slots],
            page_appends=[PageAppend(s, pages[s * per_slot : (s + 1) * per_slot]) for s in slots],
        ))
        return slots, pages

    def _close(self, slots: list[int], pages: list[int]) -> None:
        self._step(StepBatch(step_id=0, released=slots))
        self.free_pages += pages

    @contextlib.contextmanager
    def prefill(self, length: int) -> Iterator[Callable[[], None]]:
        """A prompt of ``length`` tokens in slot 0: yields its step (rerun, it rewrites the KV)."""
        slots, pages = self._open(1, length)
        ids = torch.randint(0, self.worker.config.vocab_size, (length,)).tolist()
        batch = StepBatch(step_id=0, extends=[ExtendReq(0, 0, ids)])
        try:
            yield lambda: self._step(batch)
        finally:
            self._close(slots, pages)

    @contextlib.contextmanager
    def decode(self, batch: int, context: int) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
        """``batch`` decodes whose sequences are ``context`` tokens long: yields (the whole step,
        the forward alone: inputs, graph replay and logits, without sampling)."""
        slots, pages = self._open(batch, context)
        positions = [context - 1] * batch
        step = StepBatch(step_id=0, decode_slots=slots, decode_positions=positions)
        run = self.worker.step_runner.run
        try:
            yield lambda: self._step(step), lambda: _synced(run([], slots, positions)[1])
        finally:
            self._close(slots, pages)

    def prefill_ms(self, length: int) -> float:
        with self.prefill(length) as step:
            return wall_ms(step, self.plan.warmup, self.plan.reps)

    def decode_ms(self, batch: int, context: int) -> tuple[float, float]:
        """(whole step, forward alone) of ``decode(batch, context)``."""
        with self.decode(batch, context) as (step, forward):
            return (wall_ms(step, self.plan.warmup, self.plan.reps),
                    wall_ms(forward, self.plan.warmup, self.plan.reps))


def measure_engine(worker: Worker, plan: Plan, ceilings: dict[str, float]) -> list[Row]:
    bench = StepBench(worker, plan)
    model = worker.runner.model
    kv_token = kv_bytes_per_token(*_kv_dims(worker))
    rows = []
    for length in plan.prefill_lens:
        ms = bench.prefill_ms(length)
        work = peers.prefill_work(model, length, kv_token)
        rows.append(_row("prefill", 1, length, ms, length, work, ceilings))
    for batch in plan.decode_batches:
        for context in plan.decode_contexts:
            ms, forward_ms = bench.decode_ms(batch, context)
            work = peers.decode_work(model, batch, context, kv_token)
            rows.append(_row("decode", batch, context, ms, batch, work, ceilings))
            rows[-1].forward_ms = forward_ms
    return rows


def small_batch_matmuls(worker: Worker) -> list[dict]:
    """What the worker measured at start-up for its small-batch matmuls (none off CUDA), printed."""
    measured = getattr(worker.runner.kernels.linear, "measured", [])
    if measured:
        from engine.kernels.small_batch_linear import describe

        print("small-batch matmuls, cuBLAS vs our GEMV (measured by the worker at start-up):")
        print(describe(measured))
    return [{**asdict(c), "use_gemv": c.use_gemv} for c in measured]


# ----------------------------------------------------------------------------- profile


def profile_engine(worker: Worker, plan: Plan) -> Profile:
    """The decode steps of ``plan.profile_batches`` at ``plan.profile_context`` as served (CUDA-graph
    replay on CUDA) and the prefill of ``plan.profile_prefill_len``. Should a graph replay's
    profile hold no decode-attention kernel (the profiler did not see inside the graph), the
    same decode steps are profiled eagerly as well."""
    bench = StepBench(worker, plan)
    prof = Profile(activity="cuda" if worker.loaded.device.type == "cuda" else "cpu")
    graphs = not isinstance(worker.step_runner, EagerStepRunner)
    prof.steps = [_profile_decode(bench, b, "graph" if graphs else "eager") for b in plan.profile_batches]
    if graphs and not all(has_category(s, "attention-decode") for s in prof.steps):
        prof.notes.append("no decode-attention kernel in the profile of a CUDA-graph replay: the "
                          "profiler did not see inside the graph (or CATEGORIES in bench/profile_step.py "
                          "misses a renamed kernel); the same decode steps are profiled eagerly below")
        graph_runner, worker.step_runner = worker.step_runner, EagerStepRunner(worker.runner)
        try:
            prof.steps += [_profile_decode(bench, b, "eager") for b in plan.profile_batches]
        finally:
            worker.step_runner = graph_runner
    elif graphs:
        prof.notes.append("decode steps replay CUDA graphs; the kernels inside them are counted")
    with bench.prefill(plan.profile_prefill_len) as step:
        prof.steps.append(_profile(bench, step_name("prefill", 1, plan.profile_prefill_len), "eager", step))
    return prof


def _profile_decode(bench: StepBench, batch: int, mode: str) -> StepProfile:
    context = bench.plan.profile_context
    with bench.decode(batch, context) as (step, _):
        return _profile(bench, step_name("decode", batch, context), mode, step)


def _profile(bench: StepBench, name: str, mode: str, step: Callable[[], None]) -> StepProfile:
    plan, worker = bench.plan, bench.worker
    return profile_step(name, mode, step, steps=plan.profile_steps, warmup=plan.warmup,
                        num_layers=worker.config.num_layers, device=worker.loaded.device.type)


def _synced(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _kv_dims(worker: Worker) -> tuple[int, int, int, torch.dtype]:
    cfg = worker.config
    return cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, worker.loaded.dtype


def _row(phase: str, batch: int, context: int, ms: float, tokens: int, work: peers.Work,
         ceilings: dict[str, float]) -> Row:
    memory_ms = work.bytes / (ceilings["copy_GBps"] * 1e6)
    compute_ms = work.flops / (ceilings["matmul_TFLOPs"] * 1e9)
    roofline = max(memory_ms, compute_ms)
    key = (phase, batch, context)
    return Row(
        phase, batch, context, ms, tokens / ms * 1e3, roofline,
        "memory" if memory_ms >= compute_ms else "compute", roofline / ms,
        target_ms=TARGET_MS.get(key), target_vs_matmuls=TARGET_VS_MATMULS.get(key),
    )


# ----------------------------------------------------------------------------- report


def add_comparisons(rows: list[Row], matmuls_ms: dict[int, float], hf: peers.PeerTimes) -> None:
    for row in rows:
        if row.phase == "decode" and row.batch in matmuls_ms:
            row.matmuls_ms = matmuls_ms[row.batch]
            row.vs_matmuls = row.ms / row.matmuls_ms
        hf_ms = hf.prefill_ms.get(row.context) if row.phase == "prefill" else hf.decode_ms.get(
            (row.batch, row.context))
        if hf_ms is not None:
            row.hf_ms, row.vs_hf = hf_ms, hf_ms / row.ms


def print_table(report: Report) -> None:
    if not report.meaningful:
        print("NOTE: CPU smoke test (tiny model): these numbers mean nothing.")
    ceilings = ", ".join(f"{k}={v:.4g}" for k, v in report.ceilings.items())
    print(f"{report.model} ({report.dtype}) on {report.device}; ceilings: {ceilings}")
    print(f"{'step':22} {'ms':>9} {'forward':>8} {'tokens/s':>10} {'roofline':>9} {'bound':>7} "
          f"{'of roof':>7} {'matmuls':>8} {'x mm':>6} {'HF ms':>9} {'vs HF':>6}  target")
    for r in report.rows:
        target = " ".join(filter(None, (
            f"<= {r.target_ms} ms" if r.target_ms is not None else "",
            f"<= {r.target_vs_matmuls}x mm" if r.target_vs_matmuls is not None else "",
        )))
        print(f"{r.name:22} {r.ms:9.3f} {_opt(r.forward_ms, 8, 3)} {r.tokens_per_s:10.1f} "
              f"{r.roofline_ms:9.3f} {r.roofline_bound:>7} {r.roofline_fraction:7.2f} "
              f"{_opt(r.matmuls_ms, 8, 3)} {_opt(r.vs_matmuls, 6, 2)} "
              f"{_opt(r.hf_ms, 9, 3)} {_opt(r.vs_hf, 6, 2)}  {target}")
    for line in report.skipped:
        print("skipped:", line)


def _opt(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else " " * width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL), help="a directory with config.json")
    parser.add_argument("--output", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="the embedded model at tiny shapes (CPU smoke)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers (saves its load time)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="the kernel-time breakdown of decode and prefill steps (default: on)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("without CUDA only --tiny runs")
    plan = TINY if args.tiny else FULL
    model_path = None if args.tiny else args.model_path
    torch.manual_seed(0)

    timer = make_timer(device)
    report = Report(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    meaningful=device == "cuda", model=model_path or "embedded", dtype=plan.dtype,
                    torch_version=torch.__version__)
    report.ceilings = measure_ceilings(TINY_SHAPES if args.tiny else FULL_SHAPES, device, timer)
    worker = make_worker(model_path, plan, device)
    report.small_batch_matmuls = small_batch_matmuls(worker)
    report.rows = measure_engine(worker, plan, report.ceilings)
    print_table(report)
    write_report(args.output, report)  # a run cut short by a time limit keeps the engine's numbers
    matmuls_ms = {b: timer(peers.decode_matmuls(worker.runner.model, b)) for b in plan.decode_batches}
    if args.profile:
        try:
            report.profile = profile_engine(worker, plan)
        except Exception as exc:  # noqa: BLE001 - the timings above are worth writing without it
            report.skipped.append(f"profile: {type(exc).__name__}: {exc}"[:300])
    config = worker.config
    del worker
    _free_memory(device)
    hf = peers.PeerTimes()
    if not args.no_peer:
        hf = peers.measure_transformers(config, plan, device, report.skipped)
    add_comparisons(report.rows, matmuls_ms, hf)

    print_table(report)
    if report.profile is not None:
        print(format_profile(report.profile))
    write_report(args.output, report)
    print(f"wrote {args.output}")
    return 0


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
