"""The data-plane frames are typed, versioned messages of the codec; the layout check names
the field."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from protocol.codec import PROTOCOL_VERSION, ProtocolError, decode, encode
from protocol.dataplane import (
    KVAbort,
    KVAbortAck,
    KVAck,
    KVChunk,
    KVHeartbeat,
    KVLayout,
    KVRegister,
    KVRegistered,
    KVRoom,
    KVRoomOk,
    KVRoomRefused,
    KVUnregistered,
    TokenLogprob,
)

LAYOUT = KVLayout("tiny", 2, 4, 2, 8, "float32", "zmq")
FRAMES = [
    KVRegister(LAYOUT, {"arrays": [{"handle": b"\x00\x01", "size": [2, 3]}]}, session="s", epoch=2),
    KVRegistered(ok=False, error="KV layout mismatch", epoch=2),
    KVRoom(7, [1, 2]),
    KVRoomOk(7),
    KVRoomRefused(7, "already announced"),
    KVChunk(7, [2], last=True, first_token=5, first_logprob=TokenLogprob(-0.125, [5, 9], [-0.125, -3.5])),
    KVAck(7),
    KVAbort(7, "client left"),
    KVAbortAck(7),
    KVHeartbeat(),
    KVUnregistered("dropped"),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.TYPE)
def test_every_frame_round_trips_typed(frame) -> None:
    assert frame.TYPE.startswith("kv_")
    assert decode(encode(frame)) == frame


def test_the_layout_travels_as_a_nested_dataclass() -> None:
    back = decode(encode(KVRegister(LAYOUT)))
    assert isinstance(back, KVRegister) and back.layout == LAYOUT
    assert back.layout.protocol_version == PROTOCOL_VERSION


def test_a_frame_of_another_protocol_version_is_refused() -> None:
    d = KVAck(1).to_dict()
    d["v"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(msgpack.packb(d))


def test_the_layout_mismatch_names_the_first_differing_field() -> None:
    assert LAYOUT.mismatch(LAYOUT) is None
    theirs = KVLayout("tiny", 2, 8, 2, 8, "bfloat16", "zmq")
    assert LAYOUT.mismatched_field(theirs) == "page_size"
    assert LAYOUT.mismatch(theirs) == "page_size mismatch: this side has 4, the peer has 8"


def test_another_protocol_version_is_named_before_any_other_field() -> None:
    theirs = dataclasses.replace(LAYOUT, model="other", page_size=8, protocol_version=PROTOCOL_VERSION + 1)
    assert LAYOUT.mismatched_field(theirs) == "protocol_version"
    assert LAYOUT.mismatch(theirs, "instance p0", "instance d0") == (
        f"protocol_version mismatch: instance p0 has {PROTOCOL_VERSION}, "
        f"instance d0 has {PROTOCOL_VERSION + 1}"
    )
