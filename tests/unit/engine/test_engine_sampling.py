"""The batched sampler: paths, filters, seeded determinism, the sampled distribution."""

from __future__ import annotations

import pytest
import torch

from engine.penalties import SlotPenalties, apply_penalties
from engine.sampling import SamplingBatch, exponential_noise, row_keys, sample, top_logprobs
from engine.worker import Worker
from protocol.messages import SamplingParams
from tests.oracles import greedy_reference
from tests.unit.engine.engine_driver import driver_for

CPU = torch.device("cpu")
VOCAB = 50


def draw(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    tokens, _ = sample(logits, SamplingBatch.build(params, positions, logits.shape[1], CPU))
    return tokens.tolist()


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_and_the_batch_takes_the_greedy_path() -> None:
    logits = random_logits(6)
    batch = SamplingBatch.build([SamplingParams(temperature=0.0)] * 6, list(range(6)), VOCAB, CPU)
    assert batch.all_greedy
    assert sample(logits, batch)[0].tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_a_tiny_top_p_equal_greedy() -> None:
    logits = random_logits(8)
    top_k_1 = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(8)]
    tiny_p = [SamplingParams(temperature=1.5, top_p=1e-6, seed=s) for s in range(8)]
    assert draw(logits, top_k_1, [3] * 8) == logits.argmax(-1).tolist()
    assert draw(logits, tiny_p, [3] * 8) == logits.argmax(-1).tolist()


def test_tiny_temperatures_sample_greedily_instead_of_from_nan() -> None:
    """1e-45 .. 1e-6 overflow logits / temperature to inf (softmax NaN: token 0 every time)."""
    logits = random_logits(6, seed=3)
    tiny = [SamplingParams(temperature=t, seed=1) for t in (1e-45, 1e-38, 1e-20, 1e-10, 1e-6, 9.9e-6)]
    assert draw(logits, tiny, [5] * 6) == logits.argmax(-1).tolist()
    mixed = [SamplingParams(temperature=1e-45, seed=1), SamplingParams(temperature=1.0, seed=1)]
    assert not SamplingBatch.build(mixed, [0, 0], VOCAB, CPU).all_greedy
    assert draw(logits[:2], mixed, [0, 0])[0] == logits[0].argmax().item()


def test_greedy_rows_are_unaffected_by_sampling_rows_in_the_same_batch() -> None:
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5)] * 2
    tokens = draw(logits, params, [0, 1, 2, 3])
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_in_any_batch() -> None:
    row = random_logits(1, seed=7)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    alone = [draw(row, [params], [pos])[0] for pos in range(20)]
    others = random_logits(3, seed=8)
    for pos in range(20):
        batch = torch.cat([others[:2], row, others[2:]])
        mates = [SamplingParams(temperature=0.7, seed=s) for s in (1, 2, 3)]
        assert draw(batch, [*mates[:2], params, mates[2]], [5, 9, pos, 11])[2] == alone[pos]
    assert len(set(alone)) > 3  # positions give fresh noise
    other_seed = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=99)
    assert [draw(row, [other_seed], [pos])[0] for pos in range(20)] != alone


def test_samples_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature, n = 2.0, 4000
    params = [SamplingParams(temperature=temperature, seed=3)] * n
    tokens = torch.tensor(draw(logits.expand(n, -1), params, list(range(n))))
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0] / temperature, -1), atol=0.03, rtol=0)


def test_top_k_and_top_p_keep_only_their_tokens() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0]])
    n = 300
    top_k = draw(logits.expand(n, -1), [SamplingParams(top_k=2, seed=1)] * n, list(range(n)))
    assert set(top_k) == {0, 1}
    # probabilities ≈ [.36, .33, .30, .02, .01]: a 0.5 nucleus is the first two tokens
    top_p = draw(logits.expand(n, -1), [SamplingParams(top_p=0.5, seed=1)] * n, list(range(n)))
    assert set(top_p) == {0, 1}
    both = draw(logits.expand(n, -1), [SamplingParams(top_k=1, top_p=0.9, seed=1)] * n, list(range(n)))
    assert set(both) == {0}


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = random_logits(4)
    params = [SamplingParams(temperature=t, seed=1, return_logprob=True) for t in (0.0, 0.5, 1.0, 2.0)]
    tokens, logprobs = sample(logits, SamplingBatch.build(params, [0, 1, 2, 3], VOCAB, CPU))
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected)
    no_logprobs = SamplingBatch.build([SamplingParams(temperature=0.0)] * 4, [0] * 4, VOCAB, CPU)
    assert sample(logits, no_logprobs)[1] is None


def test_noise_is_a_pure_function_of_seed_position_and_token() -> None:
    keys = row_keys(torch.tensor([1, 1, 2, 1 << 40]), torch.tensor([5, 6, 5, 5]))
    assert len(set(keys.tolist())) == 4
    noise = exponential_noise(keys, 1000)
    assert torch.equal(noise, exponential_noise(keys, 1000))
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1.0) < 0.05  # Exp(1)


def test_seeded_requests_through_the_worker_are_batch_and_retraction_invariant(
    embedded_worker: Worker,
) -> None:
    prompt = [256, 10, 20, 30, 40, 50, 60]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=77, ignore_eos=True)
    (alone,) = driver_for(embedded_worker).generate([prompt], [params])
    mate = SamplingParams(max_new_tokens=5, temperature=0.8, seed=1, ignore_eos=True)
    batched = driver_for(embedded_worker).generate([[256, 5, 6], prompt, [256, 9]], [mate, params, mate])
    assert batched[1].outputs == alone.outputs
    # retracted after 3 tokens: re-prefilled with them as prompt, the rest is the same
    resumed_params = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.95, seed=77, ignore_eos=True)
    (resumed,) = driver_for(embedded_worker).generate([prompt + alone.outputs[:3]], [resumed_params])
    assert resumed.outputs == alone.outputs[3:]


# ---------------------------------------------------------------- penalties, min_p, top logprobs


def penalized_reference(
    logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]], params: list[SamplingParams]
) -> torch.Tensor:
    """vLLM's penalties, one token at a time: repetition on prompt and output tokens, then
    frequency and presence on output tokens."""
    out = logits.clone()
    for row, (prompt, output, p) in enumerate(zip(prompts, outputs, params, strict=True)):
        for token in set(prompt) | set(output):
            value = float(out[row, token])
            out[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(output):
            out[row, token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


def random_history(rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (8,), generator=gen).tolist() for _ in range(rows)]
    outputs = [torch.randint(0, VOCAB, (12,), generator=gen).tolist() for _ in range(rows)]
    return prompts, outputs


def penalty_rows(prompts, outputs, params):
    penalties = SlotPenalties(VOCAB, CPU)
    for slot, (prompt, output, p) in enumerate(zip(prompts, outputs, params, strict=True)):
        penalties.admit(slot, p, prompt, output)
    return penalties, penalties.rows(list(range(len(params))), params)


PENALTY_CASES = {
    "frequency": dict(frequency_penalty=0.7),
    "presence": dict(presence_penalty=-1.3),
    "repetition": dict(repetition_penalty=1.6),
    "combined": dict(frequency_penalty=0.4, presence_penalty=1.1, repetition_penalty=0.7),
}


@pytest.mark.parametrize("case", PENALTY_CASES)
def test_penalties_match_the_reference(case: str) -> None:
    logits = random_logits(5, seed=11)
    prompts, outputs = random_history(5, seed=12)
    params = [SamplingParams(temperature=0.0, **PENALTY_CASES[case])] * 4 + [SamplingParams(temperature=0.0)]
    _, rows = penalty_rows(prompts, outputs, params)
    assert rows is not None
    want = penalized_reference(logits, prompts, outputs, params)
    assert torch.allclose(apply_penalties(logits, rows), want, atol=1e-5)
    batch = SamplingBatch.build(params, [0] * 5, VOCAB, CPU, rows)
    tokens, _ = sample(logits, batch)
    assert tokens.tolist() == want.argmax(-1).tolist()
    assert tokens[4].item() == logits[4].argmax().item()  # the row without a penalty


def test_a_greedy_penalty_changes_the_choice_as_the_reference_says() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 7] = 2.0, 1.8
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3)]
    _, rows = penalty_rows([[3]], [[]], params)
    tokens, logprobs = sample(logits, SamplingBatch.build(params, [0], VOCAB, CPU, rows))
    assert tokens.tolist() == [7] == penalized_reference(logits, [[3]], [[]], params).argmax(-1).tolist()
    assert logprobs is None


def test_slot_penalties_count_the_sampled_tokens_and_forget_released_slots() -> None:
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    penalties, _ = penalty_rows([[1, 2], [3]], [[4], []], params)
    assert penalties.active
    penalties.record([0, 1], torch.tensor([4, 9]))
    penalties.record([0, 1], torch.tensor([5, 9]))
    rows = penalties.rows([1, 0], params[::-1])
    assert rows is not None
    assert rows.counts[1, 4].item() == 2 and rows.counts[1, 5].item() == 1 and rows.counts[1].sum() == 3
    assert rows.seen[1, [1, 2, 4, 5]].all() and rows.seen[1].sum() == 4
    assert not rows.seen[0].any() and rows.counts[0].sum() == 0  # slot 1 asks for no penalty
    penalties.release([0])
    assert not penalties.active and penalties.rows([0, 1], params) is None


def test_min_p_drops_the_tokens_below_min_p_times_the_top_probability() -> None:
    logits = random_logits(6, seed=21)
    params = [SamplingParams(temperature=0.8, min_p=0.3, seed=s) for s in range(6)]
    positions = [4] * 6
    batch = SamplingBatch.build(params, positions, VOCAB, CPU)
    assert batch.use_min_p
    probs = torch.softmax(logits / 0.8, dim=-1)
    kept = probs >= 0.3 * probs.max(dim=-1, keepdim=True).values
    reference = torch.where(kept, probs, torch.zeros_like(probs))
    noise = exponential_noise(batch.keys, VOCAB)
    assert draw(logits, params, positions) == (reference / noise).argmax(-1).tolist()
    for pos in range(40):  # every draw is a kept token
        row = draw(logits[:1], params[:1], [pos])[0]
        assert kept[0, row]


def test_top_logprobs_are_the_largest_raw_logprobs_in_order() -> None:
    logits = random_logits(3, seed=31)
    ids, values = top_logprobs(logits, 5)
    want_values, want_ids = torch.log_softmax(logits, dim=-1).sort(dim=-1, descending=True)
    assert ids.tolist() == want_ids[:, :5].tolist()
    assert torch.allclose(values, want_values[:, :5])


def test_a_greedy_repetition_penalty_through_the_worker_matches_the_reference(
    embedded_worker: Worker,
) -> None:
    prompts = [[256, 10, 20, 30, 40, 50, 60, 70, 80, 90], [256, 7, 7, 7]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    plain = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = driver_for(embedded_worker).generate([*prompts, [256, 3]], [params, params, plain])
    assert [r.outputs for r in reqs[:2]] == greedy_reference(None, prompts, 10, repetition_penalty=1.3)
    assert reqs[2].outputs == greedy_reference(None, [[256, 3]], 6)[0]


def test_top_logprobs_through_the_worker(embedded_worker: Worker) -> None:
    params = SamplingParams(max_new_tokens=3, temperature=0.0, top_logprobs=4, ignore_eos=True)
    driver = driver_for(embedded_worker)
    (req,) = driver.generate([[256, 1, 2]], [params])
    tops = [r for r in driver.results if r.top_token_ids]
    assert tops and all(len(ids) == 4 and ids[0] == token for r in tops
                        for ids, token in zip(r.top_token_ids, r.token_ids, strict=True))
