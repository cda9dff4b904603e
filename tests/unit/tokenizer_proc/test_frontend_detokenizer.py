from __future__ import annotations

import pytest

from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_token_ids[0]


def run(pieces: list[bytes], stop: list[str] = (), finish: bool = True) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(TOK, stop)
    out = [detok.step(list(piece)) for piece in pieces]
    if finish:
        out.append(detok.finish())
    return out, detok.stopped


def test_multibyte_characters_split_over_tokens_are_never_emitted_in_part():
    data = "a日🙂é".encode()
    out, _ = run([data[i : i + 1] for i in range(len(data))])
    assert "".join(out) == "a日🙂é"
    assert "\ufffd" not in "".join(out)
    assert out[:9] == ["a", "", "", "日", "", "", "", "🙂", ""]


def test_bytes_that_can_never_complete_become_one_replacement_each():
    out, _ = run([b"a\xe6", b"\x97", b"b"])  # 3-byte lead, one continuation, then ASCII
    assert out == ["a", "", "\ufffdb", ""]
    out, _ = run([b"\xff", b"ok"])
    assert out == ["\ufffd", "ok", ""]


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    out, _ = run([b"x", "日".encode()[:2]])
    assert out == ["x", "", "\ufffd"]


def test_special_tokens_are_skipped():
    detok = IncrementalDetokenizer(TOK)
    assert detok.step([TOK.bos_token_id, *b"hi", EOS]) == "hi"


def test_stop_string_spanning_tokens_is_held_then_cut():
    out, stopped = run([b"Hel", b"lo, w", b"orld"], stop=["o, wo"])
    assert stopped
    assert out == ["Hel", "l", "", ""]
    assert "".join(out) == "Hell"


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    out, stopped = run([b"ab", b"c", b"x"], stop=["bcd"])
    assert not stopped
    assert out == ["a", "", "bcx", ""]


def test_held_tail_is_flushed_at_finish():
    out, stopped = run([b"one ", b"tw"], stop=["two"])
    assert not stopped
    assert out == ["one ", "", "tw"]


def test_earliest_of_several_stop_strings_wins():
    out, stopped = run([b"xx END yy STOP"], stop=["STOP", "END"])
    assert stopped and out == ["xx ", ""]


def test_stop_string_inside_one_token_and_text_after_it_is_dropped():
    detok = IncrementalDetokenizer(TOK, ["\n"])
    assert detok.step(list(b"line\nmore")) == "line"
    assert detok.stopped
    assert detok.step(list(b"ignored")) == "" and detok.finish() == ""


def test_stop_string_made_of_a_split_multibyte_character():
    data = "x日本".encode()
    out, stopped = run([data[i : i + 1] for i in range(len(data))], stop=["本"])
    assert stopped and "".join(out) == "x日"


@pytest.mark.parametrize("stop", [[], ["zzz"]])
def test_no_stop_means_everything_is_returned(stop):
    out, stopped = run([b"The quick ", b"brown fox"], stop=stop)
    assert not stopped and "".join(out) == "The quick brown fox"
