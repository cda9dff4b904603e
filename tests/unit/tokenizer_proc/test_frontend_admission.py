from __future__ import annotations

import pytest

from protocol.config import EMBEDDED
from tests.fakes.frontend import embedded_model_info
from tokenizer_proc.admission import Admission
from tokenizer_proc.tokenizer import ByteTokenizer, NoTextTokenizer
from tokenizer_proc.validation import InvalidRequest, ModelLimits, parse_command


def command(**fields):
    return parse_command({"type": "generate", "rid": "r", "text": "hi", **fields})


def test_limits_and_eos_come_from_the_model():
    admission = Admission(ByteTokenizer(), context_length=None)
    model = embedded_model_info(context_len=100)
    model.eos_token_ids = [EMBEDDED.eos_token_id, 5]
    admission.learn_model(model)
    assert admission.limits == ModelLimits(vocab_size=EMBEDDED.vocab_size, context_len=100)
    sampling = admission.sampling_params(command(sampling_params={"stop_token_ids": [5, 9]}))
    assert sampling.stop_token_ids == [5, 9, EMBEDDED.eos_token_id]
    assert admission.sampling_params(command(sampling_params={"ignore_eos": True})).stop_token_ids == []


def test_configured_context_length_wins_and_tokenizer_limits_are_a_fallback():
    admission = Admission(ByteTokenizer(), context_length=64)
    admission.learn_model(embedded_model_info(context_len=4096))
    assert admission.limits.context_len == 64
    fallback = Admission(ByteTokenizer(), context_length=None)
    fallback.assume_tokenizer_limits()
    assert fallback.limits == ModelLimits(EMBEDDED.vocab_size, EMBEDDED.context_len)


def test_sampling_defaults_seed_and_top_k():
    admission = Admission(ByteTokenizer(), context_length=None)
    seeds = {admission.sampling_params(command()).seed for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    sampling = admission.sampling_params(
        command(return_logprob=True, sampling_params={"top_k": 0, "seed": 3})
    )
    assert sampling.top_k == -1 and sampling.seed == 3 and sampling.return_logprob


def test_input_ids_are_tokenized_and_checked():
    admission = Admission(ByteTokenizer(), context_length=None)
    admission.learn_model(embedded_model_info(context_len=8))
    assert admission.input_ids(command(sampling_params={"max_new_tokens": 5})) == [
        EMBEDDED.bos_token_id,
        *b"hi",
    ]
    with pytest.raises(InvalidRequest, match="context length"):
        admission.input_ids(command(sampling_params={"max_new_tokens": 6}))


def test_no_text_tokenizer_needs_input_ids_and_no_stop_strings():
    admission = Admission(NoTextTokenizer(vocab_size=50, eos_token_ids=[2]), context_length=None)
    admission.assume_tokenizer_limits()
    assert admission.limits == ModelLimits(vocab_size=50, context_len=None)
    with pytest.raises(InvalidRequest, match="send input_ids"):
        admission.input_ids(command())
    with pytest.raises(InvalidRequest, match="stop strings need a tokenizer"):
        admission.input_ids(command(text=None, input_ids=[1], sampling_params={"stop": ["x"]}))
    assert admission.input_ids(command(text=None, input_ids=[1, 49])) == [1, 49]
