"""The msgpack codec: typed round trips (nested messages included), clear errors for bad frames,
and the start-up configuration's JSON round trip."""

from __future__ import annotations

import msgpack
import pytest

from protocol.config import FrontendConfig, ServerArgs, config_from_json, config_to_json
from protocol.messages import (
    PROTOCOL_VERSION,
    BatchOutput,
    ClientOutput,
    ClientStatus,
    ExtendReq,
    Heartbeat,
    InstanceStatus,
    ModelInfo,
    NewReq,
    PageAppend,
    ProtocolError,
    ReqOutput,
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


@pytest.mark.parametrize("field, value, flag", [("schedule_policy", "random", "--schedule-policy"),
                                                ("page_size", 0, "--page-size"),
                                                ("chunked_prefill_size", 2, "--chunked-prefill-size")])
def test_server_args_validation_names_the_flag(field, value, flag):
    args = ServerArgs(page_size=4, **{field: value}) if field != "page_size" else ServerArgs(page_size=value)
    with pytest.raises(ValueError, match=flag):
        args.validate()
