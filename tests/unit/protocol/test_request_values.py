"""The value checks of a generate request that the front end and every instance share."""

from __future__ import annotations

import math

import pytest

from protocol.messages import SamplingParams
from protocol.validation import EMPTY_PROMPT, SEED_LIMIT, prompt_problem, sampling_problem, token_ids_problem


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(max_new_tokens=0), "s.max_new_tokens must be at least 1, got 0"),
        (dict(temperature=-1.0), "s.temperature must be finite and >= 0"),
        (dict(temperature=math.inf), "s.temperature must be finite and >= 0"),
        (dict(top_p=0.0), "s.top_p must be in (0, 1]"),
        (dict(top_p=math.nan), "s.top_p must be in (0, 1]"),
        (dict(top_k=-2), "s.top_k must be -1, 0 (no limit) or positive"),
        (dict(seed=SEED_LIMIT), "s.seed must be in [0, 2**63)"),
    ],
)
def test_sampling_values_out_of_range_are_named(changes, words):
    assert words in sampling_problem(SamplingParams(**changes), "s.")


def test_sampling_values_at_their_limits_pass():
    assert sampling_problem(SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=-1,
                                           seed=SEED_LIMIT - 1), "") is None


def test_token_ids_name_the_first_id_outside_the_vocabulary():
    assert token_ids_problem("ids", [0, 9, 10, -1], 10) == "ids[2] = 10 is outside the vocabulary [0, 10)"
    assert token_ids_problem("ids", [0, 9], 10) is None and token_ids_problem("ids", [], 10) is None
    assert prompt_problem([], 10) == EMPTY_PROMPT
    assert prompt_problem([3, -1], 10) == "input_ids[1] = -1 is outside the vocabulary [0, 10)"
