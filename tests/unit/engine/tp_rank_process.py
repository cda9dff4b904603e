"""One rank of tests/unit/engine/test_tensor_parallel.py's two-rank checks, run as a child
process per rank (``python -m tests.unit.engine.tp_rank_process WORLD STORE OUT RANK CASES
LAYERS``): it joins the gloo group, runs the layer checks (two ranks) and the cases through
``Worker.step`` (the ``StepDriver``), and writes what it saw as JSON; rank 0 also runs each case
on an unsharded worker."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from engine.parallel.group import check_splittable
from protocol.config import ServerArgs

CHILD_TIMEOUT_S = 600
PROMPTS = [[5, 77, 200], [300, 1, 2, 9, 41, 250, 3, 17, 88, 13, 9, 41, 250, 3, 17, 88, 1], [64] * 40]
MAX_NEW = 8


def _layer_errors(tp: object) -> dict[str, float]:
    """Each parallel layer against its unsharded original, on inputs the same on every rank."""
    from engine.layers.backend import make_kernel_backend
    from engine.layers.linear import Linear, MergedLinear
    from engine.parallel.layers import (
        ColumnParallelLinear,
        LogitGather,
        ParallelLMHead,
        RowParallelLinear,
        RowRange,
        VocabParallelEmbedding,
    )

    kernels = make_kernel_backend("torch", torch.device("cpu"))
    gen = torch.Generator().manual_seed(11)
    rank = tp.rank  # type: ignore[attr-defined]
    errors = {}
    with torch.no_grad():
        # column-parallel q/k/v (KV replicated: one head over two ranks) then row-parallel o_proj
        hidden, d = 24, 4
        full_sizes = (4 * d, 1 * d, 1 * d)
        parts = (RowRange(4 * d, rank * 2 * d, 2 * d), RowRange(d, 0, d), RowRange(d, 0, d))
        dense = MergedLinear(hidden, full_sizes, bias=True)
        column = ColumnParallelLinear(hidden, parts, bias=True)
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for name in ("weight", "bias"):
            getattr(column, name).copy_(column.rank_part(name, getattr(dense, name), None))
        x = torch.randn(5, hidden, generator=gen)
        mine = column(x, kernels)
        want = dense(x, kernels).split(full_sizes, dim=-1)
        got_q, got_k, got_v = mine.split(column.output_sizes, dim=-1)
        errors["column q"] = float((got_q - want[0][:, rank * 2 * d : (rank + 1) * 2 * d]).abs().max())
        errors["column kv"] = float(max((got_k - want[1]).abs().max(), (got_v - want[2]).abs().max()))
        o_dense = Linear(4 * d, hidden, bias=True)
        o_row = RowParallelLinear(parts[0], hidden, True, tp)  # type: ignore[arg-type]
        for p in o_dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        o_row.weight.copy_(o_row.rank_part("weight", o_dense.weight, None))
        o_row.bias.copy_(o_dense.bias)
        errors["row"] = float((o_row(got_q, kernels) - o_dense(want[0], kernels)).abs().max())
        # uneven columns (3 of 4 heads on rank 0, as whole KV groups are dealt out)
        uneven = RowRange(4 * d, 0, 3 * d) if rank == 0 else RowRange(4 * d, 3 * d, d)
        o_uneven = RowParallelLinear(uneven, hidden, True, tp)  # type: ignore[arg-type]
        o_uneven.weight.copy_(o_uneven.rank_part("weight", o_dense.weight, None))
        o_uneven.bias.copy_(o_dense.bias)
        mine_q = want[0][:, uneven.start : uneven.start + uneven.size]
        errors["row, uneven"] = float((o_uneven(mine_q, kernels) - o_dense(want[0], kernels)).abs().max())
        # vocabulary-parallel embedding and LM head, an odd vocabulary (the last shard padded)
        vocab, shard = 11, 6
        table = torch.randn(vocab, hidden, generator=gen)
        embed = VocabParallelEmbedding(vocab, hidden, tp, rank * shard, shard)  # type: ignore[arg-type]
        embed.weight.copy_(embed.rank_part("weight", table, None))
        ids = torch.randint(0, vocab, (9,), generator=gen)
        errors["embedding"] = float((embed(ids) - table[ids]).abs().max())
        head = ParallelLMHead(vocab, hidden, tp, rank * shard, shard)  # type: ignore[arg-type]
        head.weight.copy_(head.rank_part("weight", table, None))
        logits = LogitGather(tp, vocab)(head(x, kernels))  # type: ignore[arg-type]
        errors["lm head"] = float((logits - x @ table.T).abs().max())
        errors["gather, uneven"] = _uneven_gather_error(tp)
    return errors


def _uneven_gather_error(tp: object) -> float:
    """A prefill instance's ranks gather staging buffers of their own head counts on rank 0
    (2 heads on rank 0, 1 on rank 1): each arrives whole, in its own shape."""
    from engine.parallel.steps import gather_to_driver

    shapes = [(4, 3, 2, 5), (4, 3, 1, 5)]
    def mine(r: int) -> torch.Tensor:
        return torch.arange(math.prod(shapes[r]), dtype=torch.float32).view(shapes[r]) + 1000 * r

    rank = tp.rank  # type: ignore[attr-defined]
    parts = gather_to_driver(tp, mine(rank), shapes)  # type: ignore[arg-type]
    if rank != 0:
        return 0.0 if parts is None else float("inf")
    assert parts is not None
    if [tuple(p.shape) for p in parts] != shapes:
        return float("inf")
    return max(float((p - mine(r)).abs().max()) for r, p in enumerate(parts))


def _run_case(
    args: ServerArgs, tp: object, prompts: list[list[int]], sampled: bool, graphs: bool = False
) -> dict:
    """Greedy (with logprobs), seeded sampling of ``prompts`` if ``sampled``, and greedy decodes
    by graph replay if ``graphs``."""
    from engine.worker import Worker
    from protocol.messages import SamplingParams
    from tests.unit.engine.engine_driver import driver_for, greedy

    worker = Worker.create(args, tp=tp)  # type: ignore[arg-type]
    plain = [greedy(MAX_NEW, return_logprob=True) for _ in prompts]
    greedy_reqs = driver_for(worker).generate(prompts, plain)
    seeded = [SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    sampled_reqs = driver_for(worker).generate(prompts, seeded) if sampled else []
    return {
        "greedy": [r.outputs for r in greedy_reqs],
        "logprobs": [r.logprobs for r in greedy_reqs],
        "sampled": [r.outputs for r in sampled_reqs],
        "pages": worker.num_pages,
        **(_replayed_greedy(worker, tp, prompts) if graphs else {}),
    }


def _replayed_greedy(worker: object, tp: object, prompts: list[list[int]]) -> dict:
    """Greedy decodes replayed from "captured" graphs (the CPU stand-in: the graph body run on
    the static buffers, its collectives included), as an instance runs them: rank 0 drives the
    steps and relays each frame first (``StepRelay``, as ``engine.pipeline.receive`` does), the
    other rank runs what it is relayed (``follow_steps``) until rank 0 relays ``Shutdown``. Each
    prompt stops sooner than the last, so the batch shrinks through padded and exact sizes."""
    from engine.cuda_graph import EagerStepRunner, GraphStepRunner
    from engine.parallel.ranks import follow_steps
    from engine.parallel.steps import StepRelay
    from protocol.messages import Shutdown, encode
    from tests.unit.engine.engine_driver import EagerCapture, StepDriver, greedy

    capture = EagerCapture()
    worker.step_runner = GraphStepRunner(worker.runner, [1, 2, 4], capture=capture)  # type: ignore[attr-defined]
    outputs = []
    try:
        if tp.rank == 0:  # type: ignore[attr-defined]
            relay = StepRelay(tp)  # type: ignore[arg-type]

            def relayed(batch):  # type: ignore[no-untyped-def]
                relay.forward(encode(batch))
                return worker.step(batch)  # type: ignore[attr-defined]

            # whole prompts in one step: the decodes then run alone, not in (eager) mixed steps
            driver = StepDriver(relayed, worker.num_pages, worker.runner.page_size, 4, 64)  # type: ignore[attr-defined]
            lengths = [MAX_NEW - 2 * i for i in range(len(prompts))]
            outputs = [r.outputs for r in driver.generate(prompts, [greedy(n) for n in lengths])]
            relay.forward(encode(Shutdown(reason="replayed")))
        else:
            follow_steps(worker.step, tp)  # type: ignore[attr-defined, arg-type]
    finally:
        worker.step_runner = EagerStepRunner(worker.runner)  # type: ignore[attr-defined]
    return {"replayed_greedy": outputs, "replays": capture.replays}


def _rank_main(world: int, store: str, out_dir: str, rank: int, cases: dict[str, dict], layers: bool) -> None:
    from engine.parallel.group import close_tensor_parallel, init_tensor_parallel
    from engine.weights import model_config
    from protocol.model_source import resolve_model
    from tests.unit.engine.engine_driver import small_args

    torch.set_num_threads(1)
    first = next(iter(cases.values()))["model_path"]
    cfg = model_config(resolve_model(first))
    tp = init_tensor_parallel(cfg, world, rank, store, torch.device("cpu"), timeout_s=CHILD_TIMEOUT_S)
    results: dict = {"layers": _layer_errors(tp) if layers and world == 2 else {}, "cases": {}}
    for name, case in cases.items():
        overrides = dict(case)
        prompts = PROMPTS[: overrides.pop("num_prompts", len(PROMPTS))]
        sampled = overrides.pop("sampled", True)
        graphs = overrides.pop("graphs", False)
        args = small_args(tp_size=world, **overrides)
        check_splittable(model_config(resolve_model(args.model_path)), world)
        # rank 0's unsharded run first: the ranks then finish (and close the group) together
        unsharded = {}
        if rank == 0:
            unsharded = _run_case(small_args(**overrides), _single_rank(), prompts, sampled=False)
        result = _run_case(args, tp, prompts, sampled, graphs)
        results["cases"][name] = result | {f"unsharded_{k}": v for k, v in unsharded.items()}
    close_tensor_parallel(tp)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _single_rank() -> object:
    from engine.parallel.group import SINGLE_RANK

    return SINGLE_RANK


if __name__ == "__main__":
    world_arg, store_arg, out_arg, rank_arg, cases_arg, layers_arg = sys.argv[1:7]
    _rank_main(int(world_arg), store_arg, out_arg, int(rank_arg), json.loads(cases_arg), layers_arg == "1")
