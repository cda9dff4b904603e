"""bench/one_batch.py at tiny shapes on CPU (its numbers mean nothing; this keeps it running),
and the roofline's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from bench import one_batch, one_batch_peers
from bench.report import collect
from engine.kv_pool import kv_bytes_per_token
from engine.weights import load_model
from protocol.config import ServerArgs


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_tiny_run_writes_every_row_with_its_comparisons(tmp_path):
    out = tmp_path / "one_batch.json"
    assert one_batch.main(["--tiny", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert not data["meaningful"] and not data["skipped"]
    plan = one_batch.TINY
    names = [(r["phase"], r["batch"], r["context"]) for r in data["rows"]]
    assert names == [("prefill", 1, n) for n in plan.prefill_lens] + [
        ("decode", b, c) for b in plan.decode_batches for c in plan.decode_contexts
    ]
    for r in data["rows"]:
        assert r["ms"] > 0 and r["roofline_ms"] > 0
        assert (r["vs_matmuls"] is not None) == (r["phase"] == "decode")
    with_peer = {(r["phase"], r["batch"], r["context"]) for r in data["rows"] if r["vs_hf"] is not None}
    assert with_peer == {("prefill", 1, plan.peer_prefill_len)} | {
        ("decode", b, plan.peer_decode_context) for b in plan.peer_decode_batches
    }
    _assert_profiled(data["profile"], plan)
    lines, notes = collect([tmp_path])
    assert not notes
    metrics = {line.metric for line in lines}
    assert "decode b=1 ctx=16 / matmuls alone" in metrics
    assert "profile decode b=1 ctx=16 [eager] kernels per layer" in metrics


def _assert_profiled(profile: dict, plan: one_batch.Plan) -> None:
    """On CPU: the decode steps eagerly (no CUDA graphs) and the prefill, as torch CPU ops."""
    assert profile["activity"] == "cpu"
    names = [(s["name"], s["mode"]) for s in profile["steps"]]
    ctx = plan.profile_context
    assert names == [(f"decode b={b} ctx={ctx}", "eager") for b in plan.profile_batches] + [
        (f"prefill 1x{plan.profile_prefill_len}", "eager")]
    for step in profile["steps"]:
        assert step["profiled_steps"] == plan.profile_steps and step["wall_ms"] > 0
        categories = {c["name"]: c for c in step["categories"]}
        assert categories["gemm"]["launches"] > 0 and categories["gemm"]["ms"] > 0
        assert sum(c["launches"] for c in step["categories"]) == step["kernels"]
        assert step["top"] and step["kernels_per_layer"] > 1


def test_work_counts_weights_kv_and_flops():
    model = load_model(ServerArgs(device="cpu")).model
    cfg = model.cfg
    kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    short, long = one_batch_peers.decode_work(model, 3, 9, kv), one_batch_peers.decode_work(model, 3, 10, kv)
    assert long.bytes - short.bytes == 3 * kv
    params = sum(p.numel() for p in model.parameters())
    embed_rows_unread = cfg.vocab_size - 3
    assert short.bytes == 4 * (params - embed_rows_unread * cfg.hidden_size) + 3 * 9 * kv
    linear = params - model.embed_tokens.weight.numel() - sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    one_token = one_batch_peers.prefill_work(model, 1, kv)
    assert one_token.flops == 2 * linear + 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers


def test_the_start_up_matmul_choices_are_reported(capsys):
    from types import SimpleNamespace

    from bench.one_batch import small_batch_matmuls
    from engine.kernels.gemv import DEFAULT_GEMV_CONFIG
    from engine.kernels.small_batch_linear import LinearChoice

    won = LinearChoice(1, 6144, 4096, cublas_ms=0.020, gemv_ms=0.017, config=DEFAULT_GEMV_CONFIG)
    def worker_with(linear):
        return SimpleNamespace(runner=SimpleNamespace(kernels=SimpleNamespace(linear=linear)))

    (row,) = small_batch_matmuls(worker_with(SimpleNamespace(measured=[won])))
    assert row["use_gemv"] and row["n"] == 6144 and row["gemv_ms"] == 0.017
    assert "rows=1 6144x4096: gemv" in capsys.readouterr().out
    assert small_batch_matmuls(worker_with(None)) == []  # F.linear: nothing measured
