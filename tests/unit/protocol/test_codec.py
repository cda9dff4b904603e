"""The msgpack codec: typed round trips (nested messages included), clear errors for bad frames
and for fields of the wrong type, enums on the wire, and the start-up configuration's JSON round
trip."""

from __future__ import annotations

import msgpack
import pytest

from protocol.codec import check_value
from protocol.config import (
    FlagChoices,
    FrontendConfig,
    InstanceAddrs,
    SchedulerConfig,
    ServerArgs,
    config_from_json,
    config_to_json,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    BatchOutput,
    ClientOutput,
    ClientStatus,
    ExtendReq,
    FinishReason,
    Heartbeat,
    InstanceStatus,
    ModelInfo,
    NewReq,
    PageAppend,
    ProtocolError,
    ReqOutput,
    Role,
    SamplingParams,
    StepBatch,
    TokenizedRequest,
    decode,
    encode,
)

MODEL = ModelInfo("m", "LlamaForCausalLM", 320, 4096, 4, 2, 32, "float32", [257])
EXAMPLES = [
    StepBatch(step_id=7, released=[3], new_reqs=[NewReq(1, SamplingParams(seed=5, stop_token_ids=[2]))],
              page_appends=[PageAppend(1, [4, 5])], extends=[ExtendReq(1, 0, [9, 8, 7], sample=False)],
              decode_slots=[0, 2], decode_positions=[10, 11]),
    BatchOutput(outputs=[ReqOutput("a", [1], logprobs=[-0.5], finished=True, finish_reason="stop"),
                         ReqOutput("b", [2, 3], queue_ms=1.5)]),
    TokenizedRequest("r1", [256, 65], SamplingParams(temperature=0.0), priority=2, room=11, prefill_addr="x"),
    Heartbeat("u0", "decode", True, "ipc://in", model=MODEL, peers={"tcp://p:1": "registered"}),
    ClientStatus("s", True, [InstanceStatus("u0", "unified", True, ready=True, total_pages=10)]),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_gives_back_equal_typed_messages(msg):
    assert decode(encode(msg)) == msg


def test_internal_messages_carry_type_and_version_and_client_ones_only_type():
    internal = msgpack.unpackb(encode(EXAMPLES[0]))
    assert internal["type"] == "step_batch" and internal["v"] == PROTOCOL_VERSION
    client = ClientOutput("r", "hi", [1], finished=False).to_dict()
    assert client["type"] == "output" and "v" not in client and "usage" not in client


@pytest.mark.parametrize(
    "frame, words",
    [
        (b"\xc1 not msgpack", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"type": "no_such_message", "v": PROTOCOL_VERSION}), "unknown message type"),
        (msgpack.packb({"type": "step_batch", "v": PROTOCOL_VERSION + 1, "step_id": 1}), "protocol version"),
        (msgpack.packb({"type": "step_batch", "v": PROTOCOL_VERSION}), "step_id"),
    ],
)
def test_bad_frames_raise_protocol_error(frame, words):
    with pytest.raises(ProtocolError, match=words):
        decode(frame)


def test_config_json_round_trip():
    cfg = FrontendConfig(ServerArgs(page_size=4, model_path="/m"), "tcp://127.0.0.1:1", "ipc://o",
                         prefill=["a"], decode=["b"])
    assert config_from_json(FrontendConfig, config_to_json(cfg)) == cfg


CHOICES = FlagChoices(schedule_policy=("fcfs", "lpm", "priority"), routing_policy=("round_robin",),
                      transfer_backend=("zmq",), attention_backend=("auto",), load_format=("auto",))


@pytest.mark.parametrize("field, value, flag", [("schedule_policy", "random", "--schedule-policy"),
                                                ("page_size", 0, "--page-size"),
                                                ("chunked_prefill_size", 2, "--chunked-prefill-size")])
def test_server_args_validation_names_the_flag(field, value, flag):
    args = ServerArgs(page_size=4, **{field: value}) if field != "page_size" else ServerArgs(page_size=value)
    with pytest.raises(ValueError, match=flag):
        args.validate(CHOICES)


# --------------------------------------------------------------------------------------------
# Type checks on decoding
# --------------------------------------------------------------------------------------------


def frame(kind: str, **fields: object) -> bytes:
    return msgpack.packb({"type": kind, "v": PROTOCOL_VERSION, **fields})


GOOD_ROW = {"rid": "a", "token_ids": [1, 2]}


WRONG_TYPES = [
    ("step_result", dict(step_id=True, slots=[], token_ids=[]),
     "step_result: step_id must be an integer; got bool"),
    ("step_result", dict(step_id="1", slots=[], token_ids=[]), "step_id must be an integer; got str '1'"),
    ("step_result", dict(step_id=1, slots=[0, True], token_ids=[]), "slots must be a list of integers"),
    ("step_result", dict(step_id=1, slots=[0], token_ids=[1.5]), "token_ids must be a list of integers"),
    ("step_result", dict(step_id=1, slots=[], token_ids=[], forward_ms=False), "forward_ms must be a number"),
    ("step_result", dict(step_id=1, slots=[], token_ids=[], logprobs=["x"]),
     "logprobs must be a list of numbers"),
    ("batch_output", dict(outputs=[GOOD_ROW, {**GOOD_ROW, "finished": 1}]),
     r"outputs\[1\].finished must be a boolean"),
    ("batch_output", dict(outputs=[{**GOOD_ROW, "finish_reason": "tired"}]),
     r"outputs\[0\].finish_reason must be one of 'stop', 'length', 'abort'; got str 'tired'"),
    ("batch_output", dict(outputs=[GOOD_ROW, 3]), "outputs must be a list of maps"),
    ("batch_output", dict(outputs=[{"rid": "a"}]), r"outputs\[0\]: .*missing .* 'token_ids'"),
    ("heartbeat", dict(name="x", role="decode", ready=True, input_addr="a", peers={"p": 1}),
     r"heartbeat: peers\['p'\] must be a string; got int 1"),
    ("heartbeat", dict(name="x", role="router", ready=True, input_addr="a"), "role must be one of"),
    ("heartbeat", dict(name="x", role="decode", ready=True, input_addr="a", model={"name": 3}),
     "model.name must be a string"),
    ("step_batch", dict(step_id=1, new_reqs=[{"slot": 0, "sampling": {"top_p": "1"}}]),
     r"new_reqs\[0\].sampling.top_p must be a number"),
    ("worker_failed", dict(message=b"bytes"), "message must be a string; got bytes"),
]


@pytest.mark.parametrize("kind, fields, words", WRONG_TYPES, ids=[w for _, _, w in WRONG_TYPES])
def test_fields_of_the_wrong_type_raise_protocol_error_naming_the_message_and_field(kind, fields, words):
    with pytest.raises(ProtocolError, match=words):
        decode(frame(kind, **fields))


def test_decoding_converts_ints_to_floats_and_names_to_enums():
    msg = decode(frame("step_result", step_id=1, slots=[0, 1], token_ids=[5, 6], logprobs=[0, -0.5],
                       forward_ms=3))
    assert msg.logprobs == [0.0, -0.5] and type(msg.logprobs[0]) is float and type(msg.forward_ms) is float
    beat = decode(frame("heartbeat", name="x", role="prefill", ready=True, input_addr="a"))
    assert beat.role is Role.PREFILL
    out = decode(encode(BatchOutput(outputs=[ReqOutput("a", [1], finished=True, finish_reason="length")])))
    assert out.outputs[0].finish_reason is FinishReason.LENGTH


def test_enums_go_on_the_wire_as_their_plain_values():
    beat = Heartbeat("u0", Role.DECODE, True, "ipc://in")
    assert encode(beat) == encode(Heartbeat("u0", "decode", True, "ipc://in"))
    assert msgpack.unpackb(encode(beat))["role"] == "decode"
    assert ClientOutput("r", "", [], True, FinishReason.STOP).to_dict()["finish_reason"] == "stop"


def test_a_malformed_request_keeps_its_type_and_readable_rid():
    with pytest.raises(ProtocolError) as err:
        decode(frame("tokenized_request", rid="r7", input_ids="abc", sampling={}))
    assert err.value.message_type == "tokenized_request" and err.value.rid == "r7"
    with pytest.raises(ProtocolError) as err:
        decode(frame("tokenized_request", rid=7, input_ids=[1], sampling={}))
    assert err.value.message_type == "tokenized_request" and err.value.rid is None


@pytest.mark.parametrize(
    "hint, value, expected",
    [(int, 3, 3), (float, 2, 2.0), (int | None, None, None), (list[str], ["a"], ["a"]),
     (dict[str, int], {"a": 1}, {"a": 1}), (SamplingParams, {"seed": 3}, SamplingParams(seed=3))],
)
def test_check_value_takes_what_fits(hint, value, expected):
    assert check_value(hint, value, "x") == expected


@pytest.mark.parametrize(
    "hint, value, words",
    [(int, True, "n.x must be an integer; got bool True"), (float, "1", "n.x must be a number"),
     (bool, 0, "n.x must be a boolean"), (list[int], (1,), "n.x must be a list of integers"),
     (SamplingParams, {"seed": "3"}, "n.x.seed must be an integer")],
)
def test_check_value_names_what_does_not_fit(hint, value, words):
    with pytest.raises(ProtocolError, match=words):
        check_value(hint, value, "n.x")


def test_config_json_rebuilds_enums_and_checks_types():
    cfg = SchedulerConfig(ServerArgs(), "prefill0", Role.PREFILL, InstanceAddrs("ipc://i", "ipc://s", "ipc://r"))
    back = config_from_json(SchedulerConfig, config_to_json(cfg))
    assert back == cfg and back.role is Role.PREFILL
    with pytest.raises(ProtocolError, match="SchedulerConfig: args.page_size must be an integer"):
        config_from_json(SchedulerConfig, config_to_json(cfg).replace('"page_size": 16', '"page_size": "16"'))


@pytest.mark.parametrize("tag", [[1], {"a": 1}, 3, None])
def test_a_type_tag_that_is_not_a_string_is_a_protocol_error(tag) -> None:
    """Found by fuzzing an instance's input: an unhashable tag escaped as TypeError and killed it."""
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(msgpack.packb({"type": tag, "v": PROTOCOL_VERSION}))


def test_encoding_after_a_failed_encode_and_from_several_threads_is_exact() -> None:
    """``encode`` keeps one msgpack Packer per thread: a pack that failed half-way leaves
    nothing behind, and threads do not share a buffer."""
    import threading

    from protocol.messages import Heartbeat, Role, decode, encode

    bad = Heartbeat(name="x", role=Role.UNIFIED, ready=True, input_addr="ipc://x")
    bad.name = object()  # type: ignore[assignment]
    with pytest.raises(TypeError):
        encode(bad)
    good = Heartbeat(name="y", role=Role.DECODE, ready=False, input_addr="ipc://y", running=3)
    assert decode(encode(good)) == good
    frames: dict[int, list[bytes]] = {}

    def encode_many(i: int) -> None:
        msg = Heartbeat(name=f"t{i}", role=Role.UNIFIED, ready=True, input_addr=f"ipc://{i}", running=i)
        frames[i] = [encode(msg) for _ in range(2000)]

    threads = [threading.Thread(target=encode_many, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in frames.items():
        assert {decode(f).running for f in got} == {i} and len(set(got)) == 1  # type: ignore[attr-defined]
