"""The ranks of a multi-node instance agree on what their collectives depend on
(``engine.parallel.steps.check_ranks_agree``, ``engine.parallel.ranks.engine_facts``): a node
started with other flags or another model is refused on both sides, naming what differs, rather
than left to hang in a collective of another shape."""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

import torch

from engine.models.config import ModelConfig
from engine.parallel.ranks import engine_facts
from protocol.config import ServerArgs

ADVICE = "start every node alike"
CHILD_TIMEOUT_S = 120


def _rank(store: str, rank: int, cases: list[dict[str, object]], out: multiprocessing.Queue) -> None:
    """One gloo rank: ``check_ranks_agree`` on each case's facts (rank 1's are changed by the
    case); what each check raised, or "", goes to ``out``."""
    import torch.distributed as dist

    from engine.parallel.group import TensorParallel
    from engine.parallel.steps import check_ranks_agree

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    tp = TensorParallel(2, rank, dist.group.WORLD, dist.group.WORLD)
    facts = engine_facts(ServerArgs(), ModelConfig.embedded(), torch.device("cpu"))
    outcomes = []
    for changes in cases:
        try:
            check_ranks_agree(tp, facts | changes if rank == 1 else facts, ADVICE)
            outcomes.append("")
        except ValueError as e:
            outcomes.append(str(e))
    out.put((rank, outcomes))
    dist.destroy_process_group()


def checked_on_two_ranks(tmp_path: Path, cases: list[dict[str, object]]) -> dict[int, list[str]]:
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    store = f"file://{tmp_path}/store"
    procs = [spawn.Process(target=_rank, args=(store, rank, cases, out)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=CHILD_TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(CHILD_TIMEOUT_S)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return results


def test_ranks_that_differ_are_refused_naming_what_differs(tmp_path: Path) -> None:
    cases = [
        {},  # the same facts: both go on
        {"--max-running-requests": 64, "model num_layers": 30},
        {"--cuda-graph-max-bs": 8},
    ]
    results = checked_on_two_ranks(tmp_path, cases)
    rank0, rank1 = results[0], results[1]
    assert rank0[0] == rank1[0] == ""
    assert rank1[1] == (
        "rank 1 differs from rank 0: --max-running-requests: 64 (rank 0: 256); model num_layers: 30 "
        f"(rank 0: 4). {ADVICE}"
    )
    assert rank0[1] == (
        "ranks differ from rank 0: rank 1: --max-running-requests: 64 (rank 0: 256); model num_layers: "
        f"30 (rank 0: 4). {ADVICE}"
    )
    assert rank1[2].startswith("rank 1 differs from rank 0: --cuda-graph-max-bs: 8 (rank 0: None).")
    assert rank0[2].startswith("ranks differ from rank 0: rank 1: --cuda-graph-max-bs: 8 (rank 0: None).")


def test_facts_are_what_the_flags_resolve_to() -> None:
    """``--dtype auto`` on the CPU is float32: a node that says so explicitly agrees; the
    scheduling flags (rank 0's scheduler makes every step) and the pool's size (the smallest
    rank's) may differ."""
    model, cpu = ModelConfig.embedded(), torch.device("cpu")
    auto = engine_facts(ServerArgs(), model, cpu)
    scheduling = ServerArgs(dtype="float32", chunked_prefill_size=64, max_total_tokens=999)
    explicit = engine_facts(scheduling, model, cpu)
    assert auto == explicit
    assert auto["--dtype"] == "float32"
    other = dataclasses.replace(model, num_kv_heads=4)
    assert engine_facts(ServerArgs(), other, cpu)["model num_kv_heads"] == 4 != auto["model num_kv_heads"]
