"""The batched sampler: paths, filters, seeded determinism, the sampled distribution."""

from __future__ import annotations

import torch

from engine.sampling import SamplingBatch, exponential_noise, row_keys, sample
from engine.worker import Worker
from protocol.messages import SamplingParams
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
