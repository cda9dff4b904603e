from __future__ import annotations

import math

import msgpack
import pytest

from tokenizer_proc.validation import (
    AbortCommand,
    ClientSampling,
    GenerateCommand,
    InvalidRequest,
    ModelLimits,
    StatusCommand,
    check_prompt,
    parse_command,
    unpack_frame,
)

LIMITS = ModelLimits(vocab_size=100, context_len=50)


def generate(**fields) -> dict:
    msg = {"type": "generate", "rid": "r1", "text": "hello"}
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not ...}


def sampling(**params) -> dict:
    return generate(sampling_params=params)


def test_full_generate_request_parses():
    cmd = parse_command(
        generate(
            stream=True,
            return_logprob=True,
            priority=3,
            sampling_params={
                "max_new_tokens": 7,
                "temperature": 0,
                "top_p": 0.5,
                "top_k": 0,
                "seed": 11,
                "stop": ["\n"],
                "stop_token_ids": [3],
                "ignore_eos": True,
            },
        )
    )
    assert cmd == GenerateCommand(
        rid="r1",
        text="hello",
        input_ids=None,
        stream=True,
        sampling=ClientSampling(7, 0.0, 0.5, 0, 11, ["\n"], [3], True),
        return_logprob=True,
        priority=3,
    )
    assert isinstance(cmd.sampling.temperature, float)


def test_defaults_and_nulls():
    cmd = parse_command(generate(text=None, input_ids=[1, 2], sampling_params=None, stream=None))
    assert cmd.input_ids == [1, 2] and cmd.text is None
    assert cmd.sampling == ClientSampling() and cmd.stream is False and cmd.priority == 0


def test_abort_and_status_parse():
    assert parse_command({"type": "abort", "rid": "a"}) == AbortCommand("a")
    assert parse_command({"type": "status", "rid": "s"}) == StatusCommand("s")


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (generate(text=""), "prompt is empty"),
        (generate(text=..., input_ids=[]), "prompt is empty"),
        (generate(text=..., input_ids=...), "exactly one of text and input_ids"),
        (generate(input_ids=[1]), "exactly one of text and input_ids"),
        (generate(text=3), "text must be a string"),
        (generate(text=..., input_ids=[1, "2"]), "input_ids must be a list of integers"),
        (generate(text=..., input_ids=[1, True]), "input_ids must be a list of integers"),
        (generate(text=..., input_ids=[1.0]), "input_ids must be a list of integers"),
        (generate(text=..., input_ids=5), "input_ids must be a list of integers"),
        (generate(stream="yes"), "stream must be a boolean"),
        (generate(stream=1), "stream must be a boolean"),
        (generate(return_logprob=0), "return_logprob must be a boolean"),
        (generate(priority=1.5), "priority must be an integer"),
        (generate(sampling_params=[1]), "sampling_params must be a map"),
        (generate(extra=1), "unknown field(s) in generate: extra"),
        (sampling(max_tokens=4), "unknown field(s) in sampling_params: max_tokens"),
        (sampling(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (sampling(max_new_tokens=-3), "max_new_tokens must be at least 1"),
        (sampling(max_new_tokens=2.0), "max_new_tokens must be an integer"),
        (sampling(max_new_tokens=True), "max_new_tokens must be an integer"),
        (sampling(max_new_tokens="8"), "max_new_tokens must be an integer"),
        (sampling(temperature=-0.1), "temperature must be finite and >= 0"),
        (sampling(temperature=math.nan), "temperature must be finite and >= 0"),
        (sampling(temperature=math.inf), "temperature must be finite and >= 0"),
        (sampling(temperature=True), "temperature must be a number"),
        (sampling(temperature="0"), "temperature must be a number"),
        (sampling(top_p=0), "top_p must be in (0, 1]"),
        (sampling(top_p=1.01), "top_p must be in (0, 1]"),
        (sampling(top_p=math.nan), "top_p must be in (0, 1]"),
        (sampling(top_k=-2), "top_k must be -1, 0 (no limit) or positive"),
        (sampling(top_k=2.5), "top_k must be an integer"),
        (sampling(seed=-1), "seed must be in [0, 2**63)"),
        (sampling(seed=2**63), "seed must be in [0, 2**63)"),
        (sampling(seed="1"), "seed must be an integer"),
        (sampling(stop="\n"), "stop must be a list of strings"),
        (sampling(stop=["a", 1]), "stop must be a list of strings"),
        (sampling(stop=[""]), "stop must not contain an empty string"),
        (sampling(stop_token_ids=[1.5]), "stop_token_ids must be a list of integers"),
        (sampling(ignore_eos=1), "ignore_eos must be a boolean"),
        ({"type": "generate", "text": "x"}, "missing field 'rid'"),
        ({"type": "abort"}, "missing field 'rid'"),
        ({"type": "status", "rid": 5}, "rid must be a string"),
        ({"type": "status", "rid": ""}, "rid must not be empty"),
        ({"type": "abort", "rid": "a", "why": "x"}, "unknown field(s) in abort: why"),
        ({"type": "embed", "rid": "a"}, "unknown message type 'embed'"),
        ({"rid": "a"}, "unknown message type None"),
    ],
)
def test_bad_requests_are_named(msg, needle):
    with pytest.raises(InvalidRequest) as err:
        parse_command(msg)
    assert needle in str(err.value)
    rid = msg.get("rid")
    assert err.value.rid == (rid if isinstance(rid, str) else None)


def test_frame_checks():
    assert unpack_frame(msgpack.packb({"type": "status"}), 100) == {"type": "status"}
    with pytest.raises(InvalidRequest, match="exceeds the limit of 10 bytes"):
        unpack_frame(msgpack.packb({"text": "x" * 20}), 10)
    with pytest.raises(InvalidRequest, match="not msgpack"):
        unpack_frame(b"\xc1", 100)
    with pytest.raises(InvalidRequest, match="not msgpack"):
        unpack_frame(msgpack.packb(1) + b"trailing", 100)
    with pytest.raises(InvalidRequest, match="must be a map"):
        unpack_frame(msgpack.packb("generate"), 100)


@pytest.mark.parametrize(
    ("ids", "max_new", "needle"),
    [
        ([], 1, "prompt is empty"),
        ([1, -1], 1, "input_ids[1] = -1 is outside the vocabulary [0, 100)"),
        ([100], 1, "input_ids[0] = 100 is outside the vocabulary"),
        ([1] * 45, 6, "prompt (45 tokens) + max_new_tokens (6) = 51 exceeds the context length (50)"),
    ],
)
def test_prompt_checks(ids, max_new, needle):
    with pytest.raises(InvalidRequest) as err:
        check_prompt(ids, ClientSampling(max_new_tokens=max_new), LIMITS)
    assert needle in str(err.value)


def test_prompt_checks_pass_at_the_limits():
    check_prompt([0, 99] * 20 + [1] * 5, ClientSampling(max_new_tokens=5), LIMITS)
    check_prompt([1] * 1000, ClientSampling(), ModelLimits(vocab_size=100, context_len=None))
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        check_prompt([1], ClientSampling(stop_token_ids=[100]), LIMITS)
