"""``LiveRequest.apply_token`` (a column row of ``BatchOutput``) leaves the same state and makes
the same client message as ``apply`` of that row as a ``ReqOutput``; and the detokenizer's
path without stop strings gives the text of the general one."""

from __future__ import annotations

import random

import pytest

from protocol.messages import ReqOutput
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.request_state import LiveRequest
from tokenizer_proc.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
STATE = ("first_token_at", "last_token_at", "completion_tokens", "finish_reason", "texts", "token_ids",
         "logprobs", "cached_tokens", "prompt_tokens", "queue_ms")


def live(stream: bool, return_logprob: bool, stop: tuple[str, ...]) -> LiveRequest:
    return LiveRequest(conn=b"c", client_rid="x", rid="i-1", route=None, stream=stream,  # type: ignore[arg-type]
                       return_logprob=return_logprob, detok=IncrementalDetokenizer(TOKENIZER, stop),
                       prompt_tokens=3, arrival=0.0)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("return_logprob", [True, False])
@pytest.mark.parametrize("stop", [(), ("lo",), ("\u00e9t",)])
def test_apply_token_is_apply_of_the_column_row(stream, return_logprob, stop):
    rng = random.Random(f"{stream}{return_logprob}{stop}")
    text = "Héllo wörld, été lo " * 3
    tokens = list(text.encode())
    a, b = live(stream, return_logprob, stop), live(stream, return_logprob, stop)
    first = ReqOutput("i-1", [tokens[0]], prompt_tokens=3, queue_ms=1.0)  # a full first row
    assert a.apply(first, 0.5) == b.apply(first, 0.5)
    for i, token in enumerate(tokens[1:], start=1):
        lp = rng.choice([None, -0.5])
        now = 1.0 + i
        via_row = a.apply(ReqOutput("i-1", [token], None if lp is None else [lp]), now)
        via_token = b.apply_token(token, lp, now)
        assert via_row == via_token
        assert via_token is None or via_token.to_dict() == via_row.to_dict()
        assert [getattr(a, k) for k in STATE] == [getattr(b, k) for k in STATE]
        if a.finished:
            break


@pytest.mark.parametrize("seed", range(5))
def test_the_plain_path_decodes_as_the_general_one(seed):
    rng = random.Random(seed)
    data = "añb€c😀d".encode() * 4
    plain = IncrementalDetokenizer(TOKENIZER)
    general = IncrementalDetokenizer(TOKENIZER, ("\x00never",))  # a stop string that never shows
    out_plain, out_general, i = [], [], 0
    while i < len(data):
        n = rng.randrange(1, 4)
        chunk = list(data[i:i + n])
        out_plain.append(plain.step(chunk))
        out_general.append(general.step(chunk))
        i += n
    out_plain.append(plain.finish())
    out_general.append(general.finish())
    assert "".join(out_plain) == "".join(out_general) == data.decode()
    assert out_plain == out_general  # piece by piece, too
