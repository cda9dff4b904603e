"""A refused registration tells an unauthenticated peer (``--insecure`` over tcp) only which
field mismatched, never this instance's values (those go to its log); an authenticated peer
(CURVE keys, or a private ipc address) hears the whole reason. The KV sender answers alike."""

from __future__ import annotations

import logging

import pytest

from protocol.dataplane import KVLayout
from protocol.messages import PeerInfo, RegisterDecode, RegisterReply, TransferEndpoint
from scheduler_proc.core import SchedulerCore
from scheduler_proc.disagg import check_peer, told_to_peer
from tests.fakes.disagg import with_layout
from tests.fakes.scheduler import FakeWorker, make_args

LAYOUT = KVLayout("m", 2, 4, 1, 8, "float32", "zmq")
OURS = PeerInfo("prefill0", "tcp://10.0.0.1:31000", TransferEndpoint(LAYOUT, "tcp://10.0.0.1:40000"))
THEIRS = PeerInfo("decode0", "tcp://10.0.0.2:31000", TransferEndpoint(LAYOUT))


def test_told_to_peer_names_only_the_field_unless_the_peer_is_authenticated():
    bad = with_layout(THEIRS, page_size=8)
    detail = check_peer(OURS, bad)
    assert detail is not None and "has 4" in detail and "has 8" in detail
    assert told_to_peer(OURS, bad, detail, authenticated=True) == detail
    told = told_to_peer(OURS, bad, detail, authenticated=False)
    assert told == "page_size mismatch" and "4" not in told


@pytest.mark.parametrize(("input_addr", "keys", "detailed"), [
    ("tcp://127.0.0.1:31000", None, False),  # --insecure
    ("tcp://127.0.0.1:31000", "/keys", True),  # CURVE: the peer holds an allowed key
    ("ipc:///tmp/pdserve-x/prefill0-input", None, True),  # only this user reaches it
])
def test_a_prefill_instance_redacts_its_reply_to_an_unauthenticated_peer(input_addr, keys, detailed, caplog):
    worker = FakeWorker(page_size=4)
    ready = worker.ready()
    ready.transfer = TransferEndpoint(LAYOUT, "tcp://127.0.0.1:40000")
    core = SchedulerCore(make_args(cluster_key_dir=keys), "prefill0", "prefill", ready, input_addr=input_addr)
    stranger = with_layout(THEIRS, page_size=8)
    with caplog.at_level(logging.WARNING):
        core.on_peer_message(RegisterDecode(stranger))
    ((addr, reply),) = core.take_peer_outbox()
    assert addr == stranger.input_addr and isinstance(reply, RegisterReply)
    assert not reply.ok and reply.info is None
    assert reply.error.startswith("page_size mismatch")
    assert ("has 4" in reply.error) is detailed
    assert "has 4" in caplog.text and "has 8" in caplog.text  # the whole reason, in the local log
