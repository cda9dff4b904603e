"""The outputs of one turn of the front end (tokenizer_proc.outbox): a request's steps read in
one turn leave merged in one ``output``, a connection's ``batch_outputs`` requests in one
``outputs`` frame, and any other message to a connection after the outputs queued for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from protocol.messages import BatchOutput, ClientOutput, ClientOutputs, FinishReason, ReqOutput
from tests.fakes.frontend import frontend_config
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.frontend import Frontend
from tokenizer_proc.outbox import Outbox, merge, mergeable
from tokenizer_proc.request_state import LiveRequest


def out(rid: str, text: str, ids: list[int], **kw) -> ClientOutput:
    return ClientOutput(rid, text, ids, kw.pop("finished", False), **kw)


def test_merge_concatenates_and_takes_the_last_finish() -> None:
    first = out("a", "He", [1], logprobs=[-0.5], top_logprobs=[[[1, -0.5]]])
    last = out("a", "llo", [2, 3], finished=True, finish_reason=FinishReason.LENGTH,
               logprobs=[-1.0, -2.0], top_logprobs=[[[2, -1.0]], [[3, -2.0]]],
               usage={"completion_tokens": 3}, metrics={"ttft_ms": 1.0})
    assert mergeable(first, last)
    merge(first, last)
    assert (first.text, first.token_ids, first.logprobs) == ("Hello", [1, 2, 3], [-0.5, -1.0, -2.0])
    assert first.top_logprobs == [[[1, -0.5]], [[2, -1.0]], [[3, -2.0]]]
    assert first.finished and first.finish_reason == FinishReason.LENGTH
    assert first.usage == {"completion_tokens": 3} and first.metrics == {"ttft_ms": 1.0}


def test_merge_without_logprobs_keeps_none() -> None:
    first = out("a", "x", [1])
    merge(first, out("a", "y", [2]))
    assert first.logprobs is None and first.top_logprobs is None and first.token_ids == [1, 2]


@pytest.mark.parametrize(("first", "later"), [
    ({"logprobs": []}, {"logprobs": [-1.0]}),  # a token that came without its logprob
    ({"logprobs": [-1.0]}, {"logprobs": []}),
    ({"top_logprobs": None, "logprobs": [-1.0]}, {"top_logprobs": [[[2, -1.0]]], "logprobs": [-1.0]}),
    ({"logprobs": None}, {"logprobs": [-1.0]}),
])
def test_outputs_whose_lists_would_not_line_up_with_their_tokens_are_not_merged(first, later) -> None:
    a, b = out("a", "x", [1], **first), out("a", "y", [2], **later)
    assert not mergeable(a, b)
    box = Outbox()
    box.add(b"c1", "r1", a, batch_outputs=False)
    box.add(b"c1", "r1", b, batch_outputs=False)
    assert box.take(b"c1") == [a, b]  # two frames, in order, each as it was


def test_outbox_frames_per_connection() -> None:
    box = Outbox()
    box.add(b"c1", "r1", out("a", "1", [1]), batch_outputs=True)
    box.add(b"c1", "r2", out("b", "1", [1]), batch_outputs=True)
    box.add(b"c1", "r3", out("c", "1", [1]), batch_outputs=False)
    box.add(b"c1", "r1", out("a", "2", [2]), batch_outputs=True)
    box.add(b"c2", "r4", out("d", "1", [1]), batch_outputs=True)
    assert box.connections() == [b"c1", b"c2"]
    batched, single = box.take(b"c1")
    assert isinstance(batched, ClientOutputs) and [(o.rid, o.token_ids) for o in batched.outputs] == [
        ("a", [1, 2]), ("b", [1])]
    assert isinstance(single, ClientOutput) and single.rid == "c"
    (alone,) = box.take(b"c2")  # a lone batched output goes as a plain output
    assert isinstance(alone, ClientOutput) and alone.rid == "d"
    assert box.connections() == [] and box.take(b"c1") == []


# ------------------------------------------------------------------ a front end, turn by turn


@pytest.fixture
def frontend(ipc_dir) -> Iterator[tuple[Frontend, zmq.Socket]]:
    """A front end driven by the test (no loop thread) and a client connection ``c1`` it knows."""
    fe = Frontend(frontend_config(ipc_dir))
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.ROUTING_ID, b"c1")
    client.setsockopt(zmq.LINGER, 0)
    client.connect(fe.cfg.client_addr)
    client.send(b"hello")
    assert fe._clients.poll(5000)
    fe._clients.recv_multipart()  # the ROUTER has seen c1: it can route to it
    yield fe, client
    client.close()
    fe.close()


def live(fe: Frontend, client_rid: str, rid: str, batch_outputs: bool = False,
         return_logprob: bool = False) -> LiveRequest:
    route = SimpleNamespace(instances=(), describe=lambda: "nowhere")  # aborts at close go nowhere
    req = LiveRequest(conn=b"c1", client_rid=client_rid, rid=rid, route=route, stream=True,
                      return_logprob=return_logprob, detok=IncrementalDetokenizer(fe._tokenizer, []),
                      prompt_tokens=3, arrival=time.perf_counter(), batch_outputs=batch_outputs)
    fe._requests.add(req)
    return req


def received(client: zmq.Socket) -> list[dict]:
    frames = []
    while client.poll(200):
        frames.append(msgpack.unpackb(client.recv()))
    return frames


def test_steps_read_in_one_turn_leave_merged(frontend) -> None:
    fe, client = frontend
    live(fe, "a", "r-a", return_logprob=True)
    tokens = list(b"Hi!")
    fe._on_instance_message(BatchOutput.of_tokens(["r-a"], [tokens[0]]))
    fe._on_instance_message(BatchOutput(rids=["r-a"], token_ids=[tokens[1]], logprobs=[-0.5]))
    final = ReqOutput("r-a", [tokens[2]], logprobs=[-0.25], finished=True, finish_reason=FinishReason.LENGTH)
    fe._on_instance_message(BatchOutput(outputs=[final]))
    assert not received(client)  # nothing leaves before the turn ends
    fe._send_outbox()
    first, rest = received(client)  # the first token came without its logprob: not merged
    assert (first["token_ids"], first["logprobs"], first["finished"]) == (tokens[:1], [], False)
    assert rest["type"] == "output" and rest["rid"] == "a" and rest["token_ids"] == tokens[1:]
    assert first["text"] + rest["text"] == fe._tokenizer.decode(tokens)
    assert rest["finished"] and rest["finish_reason"] == "length"
    assert rest["logprobs"] == [-0.5, -0.25] and rest["usage"]["completion_tokens"] == 3
    assert len(fe._requests) == 0 and fe._outbox.connections() == []


def test_batch_outputs_requests_share_one_frame_per_turn(frontend) -> None:
    fe, client = frontend
    live(fe, "a", "r-a", batch_outputs=True)
    live(fe, "b", "r-b", batch_outputs=True)
    for token in b"ab":
        fe._on_instance_message(BatchOutput.of_tokens(["r-a", "r-b"], [token, token]))
    fe._send_outbox()
    (msg,) = received(client)
    assert msg["type"] == "outputs"
    assert {o["rid"]: o["token_ids"] for o in msg["outputs"]} == {"a": list(b"ab"), "b": list(b"ab")}


def test_another_message_to_the_connection_leaves_after_its_queued_outputs(frontend) -> None:
    fe, client = frontend
    live(fe, "a", "r-a")
    fe._on_instance_message(BatchOutput.of_tokens(["r-a"], [72]))
    fe._send_error(b"c1", "x", "invalid_request", "no")
    first, second = received(client)
    assert (first["type"], first["rid"], second["type"], second["rid"]) == ("output", "a", "error", "x")
    assert fe._outbox.connections() == []


def test_a_dropped_client_s_queued_outputs_go_nowhere(frontend) -> None:
    fe, client = frontend
    live(fe, "a", "r-a")
    fe._on_instance_message(BatchOutput.of_tokens(["r-a"], [72]))
    fe._drop_client(b"c1", "it left")
    (msg,) = received(client)  # only the abort's error, no output
    assert msg["type"] == "error" and msg["rid"] == "a" and "it left" in msg["message"]
    assert len(fe._requests) == 0 and fe._outbox.connections() == []
