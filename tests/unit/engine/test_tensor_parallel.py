"""Tensor parallelism (engine.parallel): the split arithmetic, and two real gloo ranks (two
processes) whose parallel layers and whole workers are compared with the unsharded ones.

The multi-rank part runs one child process per rank (``tests.unit.engine.tp_rank_process``),
each of which writes what it saw as JSON. The packaged default model (SmolLM2-135M, GGUF) runs
over two ranks (its 3 KV heads dealt out 2 and 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.models.config import ModelConfig
from engine.parallel.group import ModelSplit, check_splittable
from protocol.config import DEFAULT_MODEL_PATH, EMBEDDED, InstanceAddrs, ServerArgs, WorkerConfig
from protocol.messages import Role
from tests import REPO_ROOT
from tests.oracles import TINY_SHAPE, write_tiny_hf_model
from tests.unit.engine.tp_rank_process import CHILD_TIMEOUT_S, MAX_NEW

# 8-token pages and a 2048-token pool: each rank's per-layer caches are small heap blocks that
# reuse the memory of the weights it just dropped (a pool read before it was written showed it)
POOL = {"page_size": 8, "max_total_tokens": 2048}

# SmolLM2-135M (launch's default model): 9 query heads over 3 KV heads
SMOLLM2 = dict(
    TINY_SHAPE, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
)


def test_split_shards_kv_heads_when_there_are_enough() -> None:
    cfg = ModelConfig.embedded()  # 8 query heads, 2 KV heads
    splits = [ModelSplit.of(cfg, 2, rank) for rank in range(2)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in splits] == [(4, 1, 0), (4, 1, 1)]
    assert [s.intermediate_size for s in splits] == [cfg.intermediate_size // 2] * 2
    assert [(s.vocab_start, s.vocab_shard) for s in splits] == [(0, 160), (160, 160)]


def test_split_replicates_kv_heads_beyond_their_number() -> None:
    cfg = ModelConfig.embedded()  # 2 KV heads over 4 ranks: each held by two ranks
    splits = [ModelSplit.of(cfg, 4, rank) for rank in range(4)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in splits] == [
        (2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1),
    ]
    # rank r's query heads 2r, 2r + 1 read KV head (2r) // 4 in the unsharded model: the same
    assert [2 * r // (cfg.num_heads // cfg.num_kv_heads) for r in range(4)] == [0, 0, 1, 1]


def test_split_pads_the_last_vocabulary_shard() -> None:
    cfg = ModelConfig.from_hf(dict(SMOLLM2, vocab_size=49153, num_attention_heads=3, num_key_value_heads=3))
    splits = [ModelSplit.of(cfg, 3, rank) for rank in range(3)]
    assert [(s.vocab_start, s.vocab_shard) for s in splits] == [(0, 16385), (16385, 16385), (32770, 16385)]
    assert splits[-1].vocab_start + splits[-1].vocab_shard > cfg.vocab_size


def test_kv_heads_that_do_not_divide_are_dealt_out_whole_with_their_query_heads() -> None:
    """The default model (9 query heads over 3 KV heads) over two ranks: 2 KV heads and their 6
    query heads on rank 0, the third with its 3 on rank 1, so each rank keeps groups of 3."""
    cfg = ModelConfig.from_hf(SMOLLM2)
    splits = [ModelSplit.of(cfg, 2, rank) for rank in range(2)]
    assert [(s.head_start, s.num_heads, s.kv_head_start, s.num_kv_heads) for s in splits] == [
        (0, 6, 0, 2), (6, 3, 2, 1),
    ]
    assert [s.intermediate_size for s in splits] == [768, 768]
    five = ModelConfig.from_hf(dict(SMOLLM2, num_attention_heads=10, num_key_value_heads=5))
    assert [(s.head_start, s.num_heads) for s in (ModelSplit.of(five, 3, r) for r in range(3))] == [
        (0, 4), (4, 4), (8, 2),
    ]
    assert ModelSplit.of(cfg, 3, 2).num_heads == 3  # even: one KV head per rank


@pytest.mark.parametrize(
    "tp_size,overrides,message",
    [
        (4, dict(num_attention_heads=6, num_key_value_heads=3), "3 KV heads: with fewer KV heads than ranks"),
        (4, dict(num_attention_heads=6, num_key_value_heads=2), "not divide the model's 6 attention heads"),
        (2, dict(num_attention_heads=8, num_key_value_heads=3), "8 attention heads do not group over its 3"),
        (2, dict(intermediate_size=131), "does not divide the model's intermediate size 131"),
        (0, {}, "--tp-size must be a positive integer"),
    ],
)
def test_a_model_that_cannot_split_is_refused_naming_why(tp_size: int, overrides: dict, message: str) -> None:
    cfg = ModelConfig.from_hf(dict(TINY_SHAPE, **overrides))
    with pytest.raises(ValueError, match=message):
        check_splittable(cfg, tp_size)


def test_a_collective_that_lost_its_peers_is_a_lost_rank_and_nothing_else_is() -> None:
    import torch.distributed as dist

    from engine.parallel.group import RankLost, TensorParallel

    tp = TensorParallel(2, 1)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:7329: Connection reset")
    lost = tp.lost(gloo)
    assert isinstance(lost, RankLost) and "rank 1: another rank of this instance is gone" in str(lost)
    assert isinstance(tp.lost(dist.DistBackendError("NCCL communicator was aborted")), RankLost)
    wrong = RuntimeError("Tensors must be contiguous")
    assert tp.lost(wrong) is wrong  # a bug stays itself


def test_each_rank_gets_a_config_and_every_start_a_new_rendezvous(tmp_path: Path) -> None:
    addrs = InstanceAddrs("ipc://in", "ipc://step", "ipc://result")
    worker = WorkerConfig(ServerArgs(tp_size=3), "unified0", Role.UNIFIED, addrs)
    ranks = worker.tensor_parallel_ranks(str(tmp_path))
    assert [r.tp_rank for r in ranks] == [0, 1, 2]
    names = ["unified0-worker", "unified0-worker-tp1", "unified0-worker-tp2"]
    assert [r.process_name for r in ranks] == names
    assert len({r.dist_init_method for r in ranks}) == 1
    assert ranks[0].dist_init_method.startswith(f"file://{tmp_path}/")
    again = worker.tensor_parallel_ranks(str(tmp_path))
    assert again[0].dist_init_method != ranks[0].dist_init_method  # a restart meets no stale file
    single = WorkerConfig(ServerArgs(), "unified0", Role.UNIFIED, addrs)
    assert single.tensor_parallel_ranks(str(tmp_path)) == [single]


@pytest.mark.parametrize("role", [Role.PREFILL, Role.DECODE])
def test_pool_to_pool_backends_move_kv_in_parts(role: Role) -> None:
    """nixl and cuda_ipc: every rank moves its own heads (over nixl even one rank, which pairs
    with the peer's ranks holding its heads); zmq (and fake): through rank 0."""
    from engine.parallel.ranks import moves_kv_in_parts

    addrs = InstanceAddrs("ipc://in", "ipc://step", "ipc://result")
    def in_parts(tp_size: int, backend: str) -> bool:
        args = ServerArgs(tp_size=tp_size, transfer_backend=backend)
        return moves_kv_in_parts(WorkerConfig(args, "x", role, addrs))

    assert in_parts(2, "nixl") and in_parts(2, "cuda_ipc")
    assert in_parts(1, "nixl") and not any(in_parts(1, backend) for backend in ("cuda_ipc", "zmq"))
    assert not in_parts(2, "zmq") and not in_parts(2, "fake")


def test_a_new_kv_pool_holds_no_stale_memory() -> None:
    """A rank frees the checkpoint tensors it kept a part of, then allocates its (small) pool
    from the same heap: the torch and CPU attention read whole pages, unwritten slots included,
    so a stale NaN there would poison every output (0 × NaN)."""
    from engine.kv_pool import KVPool

    shape = (64, 8, 1, 16)
    for _ in range(4):
        stale = torch.full(shape, float("nan"))
        del stale
        pool = KVPool.allocate(2, shape[0], shape[1], shape[2], shape[3], torch.float32, torch.device("cpu"))
        assert all(bool(torch.isfinite(c).all()) for c in pool.k + pool.v)


# ------------------------------------------------------------------------------ two real ranks


def write_dummy_config(path: Path) -> None:
    """A config.json only (served with --load-format dummy): one KV head over two ranks (each
    rank holds a replica) and an odd vocabulary (the last shard padded)."""
    cfg = dict(TINY_SHAPE, vocab_size=321, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))


def run_ranks(root: Path, world: int, cases: dict[str, dict], layers: bool = True) -> dict[int, dict]:
    """Start ``world`` rank processes on ``cases`` (and, two of them, the layer checks if
    ``layers``); what each wrote."""
    store = f"file://{root}/store"
    env = dict(os.environ, PDSERVE_TORCH_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    argv = [sys.executable, "-m", "tests.unit.engine.tp_rank_process", str(world), store, str(root)]
    procs = [
        subprocess.Popen([*argv, str(rank), json.dumps(cases), str(int(layers))], cwd=REPO_ROOT, env=env)
        for rank in range(world)
    ]
    try:
        codes = [p.wait(CHILD_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * world, f"rank processes exited with {codes}"
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(world)}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("tp")
    write_tiny_hf_model(str(root / "llama"), "llama", seed=4)
    write_tiny_hf_model(str(root / "qwen2"), "qwen2", seed=5)
    write_dummy_config(root / "dummy")
    cases = {
        "embedded": {"model_path": EMBEDDED.name, "graphs": True, **POOL},
        "llama": {"model_path": str(root / "llama"), "attention_backend": "cpu", **POOL},
        "qwen2": {"model_path": str(root / "qwen2"), **POOL},
        "dummy-replicated-kv": {
            "model_path": str(root / "dummy"), "load_format": "dummy", "graphs": True, **POOL,
        },
    }
    return run_ranks(root, 2, cases)


def test_parallel_layers_equal_the_unsharded_layers(two_rank_results: dict[int, dict]) -> None:
    for rank, results in two_rank_results.items():
        for name, error in results["layers"].items():
            assert error < 1e-5, f"rank {rank}: {name} differs from the unsharded layer by {error}"


@pytest.mark.parametrize("case", ["embedded", "llama", "qwen2", "dummy-replicated-kv"])
def test_two_ranks_generate_what_one_rank_does(two_rank_results: dict[int, dict], case: str) -> None:
    rank0, rank1 = two_rank_results[0]["cases"][case], two_rank_results[1]["cases"][case]
    # every rank samples the same tokens, greedy or seeded (the same logits everywhere)
    assert rank0["greedy"] == rank1["greedy"]
    assert rank0["sampled"] == rank1["sampled"]
    assert rank0["logprobs"] == rank1["logprobs"]
    # and the greedy tokens are the unsharded worker's, token for token
    assert rank0["greedy"] == rank0["unsharded_greedy"]
    assert all(len(out) == MAX_NEW for out in rank0["greedy"])
    assert rank0["pages"] == rank0["unsharded_pages"]
    for got, want in zip(rank0["logprobs"], rank0["unsharded_logprobs"], strict=True):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("case", ["embedded", "dummy-replicated-kv"])
def test_each_rank_replays_its_decode_graphs_in_step_with_the_others(
    two_rank_results: dict[int, dict], case: str
) -> None:
    """CUDA graphs per rank, their CPU-testable part, served as an instance serves: rank 0
    relays each step, the other rank follows. Both replay the same padded batch sizes, and the
    replayed decodes, padding rows and all, give the eager tokens."""
    rank0, rank1 = two_rank_results[0]["cases"][case], two_rank_results[1]["cases"][case]
    assert rank0["replays"] == rank1["replays"]
    assert {1, 2, 4} <= set(rank0["replays"]), rank0["replays"]
    want = [out[: MAX_NEW - 2 * i] for i, out in enumerate(rank0["greedy"])]
    assert rank0["replayed_greedy"] == want


def test_the_default_model_over_two_ranks_generates_what_one_rank_does(tmp_path: Path) -> None:
    """SmolLM2-135M from its GGUF file (9 query heads over 3 KV heads: 6 and 2 on rank 0, 3 and 1
    on rank 1)."""
    pytest.importorskip("gguf", reason="the packaged model is a GGUF file")
    from protocol.model_source import PACKAGED_MODELS

    try:
        PACKAGED_MODELS[DEFAULT_MODEL_PATH].locate()
    except FileNotFoundError as e:
        pytest.skip(f"the packaged GGUF model is not installed: {e}")
    case = {"model_path": DEFAULT_MODEL_PATH, "num_prompts": 2, "sampled": False, **POOL}
    results = run_ranks(tmp_path, 2, {"default": case}, layers=False)
    ranks = [results[rank]["cases"]["default"] for rank in range(2)]
    assert ranks[0]["greedy"] == ranks[1]["greedy"]
    assert ranks[0]["greedy"] == ranks[0]["unsharded_greedy"]
    assert len(ranks[0]["greedy"]) == 2 and all(len(out) == MAX_NEW for out in ranks[0]["greedy"])
