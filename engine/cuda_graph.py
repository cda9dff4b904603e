"""CUDA graphs for decode steps, and the choice between graph replay and eager steps.

At start-up a CUDA worker captures one graph per batch size of ``capture_batch_sizes`` (largest
first, all in one memory pool). A decode-only step of B requests replays the graph of the
smallest captured size >= B; the rows past B are padding: slot ``PADDING_SLOT`` at position 0,
which the graph turns into a page-table row of zeros, sequence length 1 and a KV write into
slot 0 of the padding page 0. Their logits are ignored. Steps with extends, and decode steps
larger than the largest captured size, run eagerly.

What a graph holds: everything from the step's (slot, position) pairs to the logits — the
input tokens read from the future-token map, page-table rows, KV locations, sequence lengths,
the forward and the lm_head. The host's work per replay is one copy of 2 x B int64 into the
static input buffer. The logits are inside because they are a fixed-shape function of the
forward's output (one more cuBLAS call the graph launches for free). Sampling stays outside:
its path (greedy, top-k, top-p, logprobs) is decided per step on the host from the requests'
parameters, and it is a handful of kernels next to the model's hundreds.

The page-table rows are full width (the longest context), in graphs and eager steps alike, so
the decode kernel picks its split count from the batch size alone: capturing the graphs
compiles the variants that eager decode steps use later.

Each rank of a tensor-parallel instance captures its own graphs, with its part of the model and
the collectives (NCCL) inside them. The ranks capture the same batch sizes in the same order
(the sizes follow from the flags, the same on every rank), and every step reaches every rank,
so they replay the same graph at the same step and the collectives inside meet. A capture
checks only its own thread (``thread_local``): the NCCL watchdog and the transfer threads may
query their events meanwhile.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.layers.attention import AttentionMetadata
from engine.runner import ModelRunner, StepInputs
from protocol.config import ServerArgs
from protocol.messages import ExtendReq

logger = logging.getLogger("pdserve.worker")

PADDING_SLOT = -1
SMALL_BATCH_SIZES = (1, 2, 4, 8, 12)  # then every multiple of 8 (SGLang's list)
BATCH_SIZE_STEP = 8
WARMUP_RUNS = 2  # eager runs before each capture: compile the kernels, settle cuBLAS workspaces


class StepRunner(Protocol):
    """Runs one step's forward: the step's device inputs and the float32 logits of its
    sampling rows."""

    def run(
        self, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> tuple[StepInputs, torch.Tensor]: ...


def make_step_runner(runner: ModelRunner, args: ServerArgs) -> StepRunner:
    """Graph replay for decode steps on CUDA with the Triton kernels (the torch reference
    attention reads sequence lengths on the host, which a graph cannot); eager otherwise."""
    max_bs = min(args.graph_max_batch, runner.max_slots)
    if runner.device.type != "cuda" or args.disable_cuda_graph or max_bs < 1:
        return EagerStepRunner(runner)
    if runner.kernels.name != "triton":
        logger.warning("CUDA graphs need the triton attention backend; decoding eagerly")
        return EagerStepRunner(runner)
    return GraphStepRunner(runner, capture_batch_sizes(max_bs))


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 12, then every multiple of 8 up to ``max_bs``, and ``max_bs`` itself."""
    sizes = [s for s in SMALL_BATCH_SIZES if s <= max_bs]
    sizes += range(2 * BATCH_SIZE_STEP, max_bs + 1, BATCH_SIZE_STEP)
    if sizes and sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def padded_batch_size(sizes: Sequence[int], batch: int) -> int | None:
    """The smallest of the (ascending) ``sizes`` that holds ``batch`` rows; None if none does."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


def padded_decode_inputs(
    decode_slots: Sequence[int], decode_positions: Sequence[int], batch_size: int
) -> torch.Tensor:
    """[2, batch_size] int64 on the host: slots, then positions; padding rows after the real ones."""
    pad = batch_size - len(decode_slots)
    return torch.tensor(
        [[*decode_slots, *[PADDING_SLOT] * pad], [*decode_positions, *[0] * pad]], dtype=torch.int64
    )


def decode_inputs(
    runner: ModelRunner, slots: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Input ids and attention metadata of a decode batch, on the device only (capturable).
    A row whose slot is negative is padding: it reads and writes page 0 with length 1."""
    live = slots >= 0
    safe_slots = slots.clamp(min=0)
    page_table = runner.page_table[safe_slots] * live.unsqueeze(1)  # full-width rows, int32
    page_size = runner.page_size
    pages = page_table.gather(1, (positions // page_size).unsqueeze(1)).squeeze(1)
    meta = AttentionMetadata(
        num_extend_tokens=0,
        out_loc=pages.long() * page_size + positions % page_size,
        decode_page_table=page_table,
        decode_seq_lens=(positions + 1).to(torch.int32),
    )
    return runner.next_tokens[safe_slots], meta


@dataclass
class DecodeOutputs:
    """The tensors one decode forward produced (static ones, for a captured graph)."""

    input_ids: torch.Tensor  # [bs]
    meta: AttentionMetadata
    logits: torch.Tensor  # [bs, vocab] float32


def decode_forward(runner: ModelRunner, slots: torch.Tensor, positions: torch.Tensor) -> DecodeOutputs:
    """The body of a decode graph: (slots, positions) → logits, with no host sync."""
    input_ids, meta = decode_inputs(runner, slots, positions)
    hidden = runner.forward(input_ids, positions, meta)
    return DecodeOutputs(input_ids, meta, runner.model.compute_logits(hidden, runner.kernels))


@torch.inference_mode()
def compile_decode_variants(runner: ModelRunner) -> None:
    """Run an eager decode of padding rows at batch sizes 1, 2, 4, ... up to the slot count, so
    that every decode-kernel variant an eager step can pick (its split count halves at most
    once per doubling of the batch) is compiled before the worker reports ready."""
    batch = 1
    while batch <= runner.max_slots:
        slots = torch.full((batch,), PADDING_SLOT, dtype=torch.int64, device=runner.device)
        decode_forward(runner, slots, torch.zeros_like(slots))
        batch *= 2


@dataclass
class EagerStepRunner:
    runner: ModelRunner

    def run(
        self, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> tuple[StepInputs, torch.Tensor]:
        inputs = self.runner.prepare(extends, decode_slots, decode_positions)
        return inputs, self.runner.logits(inputs)


@dataclass
class CapturedDecode:
    """One batch size's decode: ``replay()`` recomputes ``outputs`` in place from the static
    input buffer (a CUDA graph's replay, or a stand-in in CPU tests)."""

    replay: Callable[[], None]
    outputs: DecodeOutputs


# (runner, static [2, max_bs] input buffer, ascending batch sizes) → one CapturedDecode per size
Capture = Callable[[ModelRunner, torch.Tensor, Sequence[int]], dict[int, CapturedDecode]]


class GraphStepRunner:
    """Replays a captured decode for decode-only steps that fit one; runs the rest eagerly."""

    def __init__(
        self, runner: ModelRunner, batch_sizes: Sequence[int], capture: Capture | None = None
    ) -> None:
        self.runner = runner
        self.eager = EagerStepRunner(runner)
        self.batch_sizes = list(batch_sizes)
        with torch.inference_mode():
            max_bs = self.batch_sizes[-1]
            # slots and positions of the padded batch, the graphs' only input; until the first
            # replay every row is padding (warm-up and capture touch only page 0)
            self.inputs = torch.empty(2, max_bs, dtype=torch.int64, device=runner.device)
            self.inputs[0].fill_(PADDING_SLOT)
            self.inputs[1].zero_()
            self.rows = torch.arange(max_bs, dtype=torch.int64, device=runner.device)
            self.graphs = (capture or capture_cuda_graphs)(runner, self.inputs, self.batch_sizes)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def run(
        self, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> tuple[StepInputs, torch.Tensor]:
        batch_size = None if extends else padded_batch_size(self.batch_sizes, len(decode_slots))
        if batch_size is None or not decode_slots:
            return self.eager.run(extends, decode_slots, decode_positions)
        layout = self.runner.layout([], decode_slots, decode_positions)
        host = padded_decode_inputs(decode_slots, decode_positions, batch_size)
        self.inputs[:, :batch_size].copy_(host, non_blocking=True)
        captured = self.graphs[batch_size]
        captured.replay()
        n = len(decode_slots)
        slots, positions = self.inputs[:, :n]
        out = captured.outputs
        # Views of static buffers: valid until the next replay, which is stream-ordered after
        # every use the worker makes of them (sampling, the future-token map).
        inputs = StepInputs(
            input_ids=out.input_ids[:n],
            positions=positions,
            meta=out.meta,  # of the padded batch
            sample_rows=self.rows[:n],
            sample_slots_device=slots,
            sample_slots=layout.sample_slots,
            sample_positions=layout.sample_positions,
        )
        return inputs, out.logits[:n]


def capture_cuda_graphs(
    runner: ModelRunner, inputs: torch.Tensor, batch_sizes: Sequence[int]
) -> dict[int, CapturedDecode]:
    """One CUDA graph per batch size, largest first, so the smaller graphs reuse its memory in
    the shared pool."""
    start = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(runner.device)
    graphs = {bs: _capture(runner, inputs[:, :bs], pool, stream) for bs in reversed(batch_sizes)}
    torch.cuda.synchronize(runner.device)
    logger.info(
        "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
        len(graphs), _ranges(batch_sizes), time.perf_counter() - start,
    )
    return graphs


def _capture(
    runner: ModelRunner, inputs: torch.Tensor, pool: tuple[int, int], stream: torch.cuda.Stream
) -> CapturedDecode:
    slots, positions = inputs
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            decode_forward(runner, slots, positions)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = decode_forward(runner, slots, positions)
    return CapturedDecode(graph.replay, outputs)


def _ranges(sizes: Sequence[int]) -> str:
    return f"{sizes[0]}..{sizes[-1]}" if len(sizes) > 3 else ", ".join(map(str, sizes))
