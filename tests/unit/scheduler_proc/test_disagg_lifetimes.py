"""Which requests a timeout, a guard, a dead peer or a late abort may end: only those that still
depend on what failed. Whatever ends, its pages come back."""

from __future__ import annotations

from protocol.messages import PEER_UNAVAILABLE, QUEUE_FULL, TRANSFER_FAILED, RoomAbort
from scheduler_proc.core import SchedulerCore
from scheduler_proc.rooms import RoomState
from tests.fakes.disagg import Cluster, TokenizedRequest, expected, open_rooms, peers, sampling, state_of

PROMPT = list(range(1, 22))
GUARD_S = 2 * 30.0 + 5.0  # twice the transfer timeout plus the heartbeat timeout (the cluster's)


def tick_past_the_guard(c: Cluster, core: SchedulerCore) -> None:
    """Only ``core`` sees the time pass (its peers count as alive): the other side's guard must
    not fire first."""
    c.now += GUARD_S + 1.0
    for peer in peers(core):
        peer.last_seen = c.now
    core.tick(c.now)


def assert_pages_back(core: SchedulerCore) -> None:
    status = core.status()
    assert not core.requests and not open_rooms(core), status
    assert status.free_pages + status.cached_pages == status.total_pages, status


def test_losing_a_prefill_peer_spares_a_retracted_request_that_no_longer_needs_it():
    c = Cluster(num_prefill=2, worker={"num_pages": 9}, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    c.connect()
    for i in range(3):
        c.submit(f"r{i}", [1 + i, 2, 3, 4, 5], p=0, max_new=10, seed=i, stop=False)
    d = c.decodes[0].core
    for _ in range(200):
        c.round()
        retracted = [r for r in d.waiting if r.output_ids]
        if retracted:
            break
    assert retracted, "the decode side never retracted a request"
    c.kill(c.prefills[0])
    c.now += 6.0  # past the heartbeat timeout before the retracted request resumes: prefill0 is lost
    c.round()
    assert d.peer_states()[c.prefills[0].addr] == "connecting"
    c.run()
    for i in range(3):
        assert not c.log.failed.get(f"r{i}"), f"r{i}"
        assert c.log.tokens[f"r{i}"] == expected([1 + i, 2, 3, 4, 5], 10, seed=i, stop=False)
    c.instances.pop(c.prefills[0].addr)
    c.assert_no_leak()


def test_queueing_on_a_busy_decode_instance_outlasts_the_transfer_timeout():
    c = Cluster(
        worker=dict(num_pages=400, page_size=4, max_slots=8),
        decode_worker=dict(max_slots=3),
        max_running_requests=1,
    )
    c.connect()
    c.submit("long", [1, 2, 3, 4, 5], max_new=800, stop=False)
    c.submit("queued", [6, 7, 8, 9], max_new=4, stop=False)
    while "long" not in c.log.finish:
        c.now += 0.05  # 40 s of decoding "long" while "queued" waits for a destination
        c.round()
    c.run()
    assert not c.log.failed
    assert c.log.tokens["queued"] == expected([6, 7, 8, 9], 4, stop=False)
    c.assert_no_leak()


def test_the_decode_guard_releases_the_pages_of_a_room_the_worker_never_reports():
    c = Cluster()
    c.connect()
    room = c.submit("stuck", PROMPT)
    c.link.hold(room)
    c.run()
    d = c.decodes[0].core
    tick_past_the_guard(c, d)
    assert [f.code for f in d.take_outbox()] == [TRANSFER_FAILED]
    assert_pages_back(d)
    batch = d.form_step()
    assert batch is not None and batch.abort_rooms == [room]  # the worker drops the room too
    (abort,) = [m for addr, m in d.take_peer_outbox() if isinstance(m, RoomAbort)]
    assert abort.room == room


def test_the_prefill_guard_releases_the_pages_of_a_room_the_worker_never_reports():
    c = Cluster()
    c.connect()
    room = c.submit("stuck", PROMPT)
    c.link.hold(room)
    c.run()
    p = c.prefills[0].core
    assert open_rooms(p)  # prefilled, waiting for the decode side's acknowledgement
    tick_past_the_guard(c, p)
    assert [f.code for f in p.take_outbox()] == [TRANSFER_FAILED]
    assert_pages_back(p)


def test_a_draining_room_the_worker_never_reports_gives_its_pages_back():
    c = Cluster()
    c.connect()
    room = c.submit("stuck", PROMPT)
    c.link.hold(room)
    c.link.abort = lambda room, reason: None  # the data plane lost the room: it never reports it
    c.run()
    c.abort("stuck")
    c.run()
    cores = [c.prefills[0].core, c.decodes[0].core]
    assert all(state_of(core, room) is RoomState.DRAINING for core in cores)
    c.advance(GUARD_S + 2.0)
    for core in cores:
        assert_pages_back(core)
    assert not c.log.failed.get("stuck") and c.log.finish["stuck"] == "abort"


def test_a_late_prefill_side_failure_does_not_end_a_request_already_decoding():
    c = Cluster()
    c.connect()
    room = c.submit("a", PROMPT, max_new=30, stop=False)
    while len(c.log.tokens["a"]) < 2:
        c.round()
    p = c.prefills[0]
    c.decodes[0].inbox.append(RoomAbort(room, "a", p.addr, TRANSFER_FAILED, "late"))
    c.run()
    assert not c.log.failed.get("a")
    assert c.log.tokens["a"] == expected(PROMPT, 30, stop=False)
    c.assert_no_leak()


def test_queued_requests_count_those_waiting_for_a_transfer():
    c = Cluster(max_queued_requests=1)
    c.connect()
    p, d = c.prefills[0], c.decodes[0]
    p.inbox.append(TokenizedRequest("a", PROMPT, sampling(), room=1))  # waits for its destination
    p.inbox.append(TokenizedRequest("b", PROMPT, sampling(), room=2))
    c.link.hold(3)
    d.inbox.append(TokenizedRequest("c", PROMPT, sampling(), room=3, prefill_addr=p.addr))
    d.core.max_running = 0  # "c" stays in the transfer queue
    d.inbox.append(TokenizedRequest("d", PROMPT, sampling(), room=4, prefill_addr=p.addr))
    c.run()
    assert p.core.queued_requests() == 1 and d.core.queued_requests() == 1
    assert [f.code for f in c.log.failed["b"]] == [QUEUE_FULL]
    assert [f.code for f in c.log.failed["d"]] == [QUEUE_FULL]
    assert PEER_UNAVAILABLE not in {f.code for fs in c.log.failed.values() for f in fs}
