"""The model against Hugging Face transformers on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.kernels import reference
from engine.layers.attention import AttentionMetadata
from engine.layers.backend import make_kernel_backend
from engine.worker import Worker
from protocol.messages import ExtendReq
from tests.oracles import write_tiny_hf_model
from tests.unit.engine.engine_driver import small_args


def engine_logits(worker: Worker, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, prefilled in ``chunks`` through the pool."""
    runner = worker.runner
    num_pages = -(-len(token_ids) // runner.page_size)
    runner.append_pages([(0, list(range(1, num_pages + 1)))])
    out, start = [], 0
    for size in chunks:
        inputs = runner.prepare([ExtendReq(0, start, token_ids[start : start + size])], [], [])
        hidden = runner.forward(inputs.input_ids, inputs.positions, inputs.meta)
        out.append(runner.model.compute_logits(hidden, runner.kernels))
        start += size
    runner.release_slots([0])
    return torch.cat(out)


def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97, 16, 93, 99]


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_logits_match_transformers(arch_dir: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch_dir)
    worker = Worker.create(small_args(model_path=path))
    expected = hf_logits(path, PROMPT)
    torch.testing.assert_close(engine_logits(worker, PROMPT, [len(PROMPT)]), expected, atol=1e-4, rtol=1e-4)
    # the same sequence in page-crossing chunks reads its prefix back from the pool
    torch.testing.assert_close(engine_logits(worker, PROMPT, [5, 8, 1, 9]), expected, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path: Path, tiny_llama_dir: str) -> None:
    write_tiny_hf_model(str(tmp_path), "llama", seed=1, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = Worker.create(small_args(model_path=str(tmp_path))).runner.model.state_dict()
    single = Worker.create(small_args(model_path=tiny_llama_dir)).runner.model.state_dict()
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor), name


def test_tied_model_has_no_separate_lm_head(tiny_qwen2_dir: str) -> None:
    model = Worker.create(small_args(model_path=tiny_qwen2_dir)).runner.model
    assert model.lm_head is None
    assert model.lm_head_weight is model.embed_tokens.weight


def test_mixed_step_equals_separate_steps(embedded_worker: Worker) -> None:
    """Extend rows then decode rows in one step give the logits each part gives alone."""
    runner = embedded_worker.runner
    runner.append_pages([(1, [1, 2, 3]), (2, [4, 5])])
    prefix = [7, 8, 9, 10, 11, 12, 13]
    decode_in = runner.prepare([ExtendReq(1, 0, prefix)], [], [])
    runner.forward(decode_in.input_ids, decode_in.positions, decode_in.meta)
    runner.set_next_tokens(torch.tensor([1]), torch.tensor([42]))

    extend = ExtendReq(2, 0, [5, 6, 7, 8, 9], sample=True)
    mixed = runner.logits(runner.prepare([extend], [1], [len(prefix)]))
    alone_extend = runner.logits(runner.prepare([extend], [], []))
    alone_decode = runner.logits(runner.prepare([], [1], [len(prefix)]))
    torch.testing.assert_close(mixed, torch.cat([alone_extend, alone_decode]), atol=1e-5, rtol=1e-5)
    runner.release_slots([1, 2])


def test_metadata_of_a_mixed_step(embedded_worker: Worker) -> None:
    runner = embedded_worker.runner
    ps = runner.page_size
    runner.append_pages([(1, [9, 4]), (2, [6])])
    inputs = runner.prepare([ExtendReq(1, 3, [1, 2, 3], sample=False)], [2], [2])
    meta: AttentionMetadata = inputs.meta
    assert meta.num_extend_tokens == 3
    assert meta.out_loc.tolist() == [9 * ps + 3, 4 * ps + 0, 4 * ps + 1, 6 * ps + 2]
    assert meta.extend_prefix_lens.tolist() == [3]
    assert meta.extend_qo_indptr.tolist() == [0, 3]
    assert meta.extend_page_table[:, :2].tolist() == [[9, 4]]  # rows are full width
    assert meta.decode_seq_lens.tolist() == [3]
    assert meta.decode_page_table[:, :1].tolist() == [[6]]
    assert meta.decode_page_table.shape[1] == meta.extend_page_table.shape[1] == runner.max_pages_per_req
    assert inputs.sample_slots == [2] and inputs.sample_rows.tolist() == [3]
    assert inputs.sample_positions == [3]
    runner.release_slots([1, 2])


def test_a_step_past_the_appended_pages_is_refused(embedded_worker: Worker) -> None:
    runner = embedded_worker.runner
    runner.append_pages([(1, [3])])
    with pytest.raises(ValueError, match="slot 1 needs 5 tokens"):
        runner.prepare([ExtendReq(1, 0, [1, 2, 3, 4, 5])], [], [])
    with pytest.raises(ValueError, match="slot 1 needs 6 tokens"):
        runner.prepare([], [1], [5])
    runner.release_slots([1])


def test_kernel_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert make_kernel_backend("auto", cpu).name == "cpu"  # the CPU kernels (engine.kernels.cpu) off CUDA
    kernels = make_kernel_backend("torch", cpu)
    assert kernels.rotary_store_kv is reference.rotary_store_kv_ref
    assert kernels.rms_norm is reference.rms_norm_ref
    with pytest.raises(ValueError, match="flash"):
        make_kernel_backend("flash", cpu)


def test_step_inputs_start_16_byte_aligned(embedded_worker: Worker) -> None:
    """Triton specializes on pointer alignment: odd-length segments must not misalign the next."""
    runner = embedded_worker.runner
    runner.append_pages([(1, [1, 2]), (2, [3]), (3, [4])])
    inputs = runner.prepare([ExtendReq(1, 0, [1, 2, 3])], [2, 3], [0, 1])
    for tensor in (inputs.input_ids, inputs.positions, inputs.sample_rows, inputs.sample_slots_device):
        assert tensor.data_ptr() % 16 == 0
    assert inputs.positions.tolist() == [0, 1, 2, 0, 1]
    runner.release_slots([1, 2, 3])
