"""KV transfer between tensor-parallel instances of the same ``--tp-size`` over a pool-to-pool
backend (``nixl``, ``cuda_ipc``): a room in parts, each rank moving its own KV heads.

Every rank of both instances runs its own sender or receiver over its own pool, advertising
the instance's layout with its own ``tp_rank`` (``tp_hub.instance_layout``), so that the data plane pairs
prefill rank r with decode rank r and refuses anything else; the prefill ranks' senders bind
addresses of their own (``rank_transfer_address``), which rank 0 gathers and advertises
(``TransferEndpoint.rank_addresses``). The scheduler still sees one room: every rank acts on
the same relayed frames (opens, sends, expects and aborts the same rooms, samples the same
first token), and each reports the one final result of its part, refusals included, to rank 0
(``PartReporter``, a zmq PUSH over ipc beside the instance's rendezvous); rank 0 reports a room
once every part is in (``RoomParts``): DONE when every part is, else FAILED naming the ranks
that failed. So a room's pages are the scheduler's again only when no rank moves them any more.
A decode instance's registration is rank 0's and every other rank's with its prefill rank,
reported once all are in (``RegistrationBarrier``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import zmq

from kvtransfer.base import KVReceiver, KVSender, RoomResult, TransferState
from kvtransfer.notifier import Notifier
from protocol import transport
from protocol.codec import ProtocolError
from protocol.messages import (
    KVPeerRegistered,
    LinkStatesPart,
    RegistrationPart,
    RoomPart,
    TransferResult,
    decode,
)

logger = logging.getLogger("kvtransfer")

REPORT_LINGER_MS = 2000  # a closing reporter lets its last parts leave
PARTS_SUFFIX = "-kv-parts"


def parts_address(dist_init_method: str) -> str:
    """Where rank 0 collects the parts: beside the instance's ``file://`` rendezvous (new at
    every start, in the 0700 ipc directory)."""
    if not dist_init_method.startswith("file://"):
        raise ValueError(
            f"a room in parts needs the ranks on one host (a file:// rendezvous); got {dist_init_method!r}"
        )
    return "ipc://" + dist_init_method.removeprefix("file://") + PARTS_SUFFIX


def rank_transfer_address(address: str, rank: int) -> str:
    """Rank ``rank``'s sender's address from rank 0's: a free port of the same host for tcp,
    a sibling path for ipc."""
    if rank == 0 or address.endswith(":*"):
        return address
    return f"{address}{rank}"


def peer_for_rank(rank_addresses: Sequence[str], rank: int) -> str:
    if rank >= len(rank_addresses):
        raise ValueError(
            f"the prefill instance advertised {len(rank_addresses)} rank senders; "
            f"rank {rank} has none to pair with"
        )
    return rank_addresses[rank]


class PartReporter:
    """A rank's end of the parts channel: a ``Notifier`` reports each final result of its side's
    rooms to rank 0; the step thread reports its refusals (``refused``), a decode rank its
    registrations (``registered``)."""

    def __init__(self, ctx: zmq.Context, address: str, rank: int, side: KVSender | KVReceiver) -> None:
        self._rank = rank
        self._notifier = Notifier(ctx, address, side, REPORT_LINGER_MS, rank=rank)

    def refused(self, results: Sequence[TransferResult]) -> list[TransferResult]:
        """Report rooms this rank's side would not take as failed parts; nothing is left for
        the scheduler directly (rank 0 reports the room once every part is in)."""
        for result in results:
            self._notifier.notify(RoomPart(self._rank, result))
        return []

    def registered(self, attempt: int, outcome: KVPeerRegistered) -> None:
        self._notifier.notify(RegistrationPart(self._rank, attempt, outcome))

    def close(self) -> None:
        self._notifier.close()


class RoomParts:
    """Rank 0's end of the parts channel, polled by its ``Notifier`` (thread) like a side: each
    room's result once every rank's part is in, and every rank's links."""

    def __init__(self, ctx: zmq.Context, address: str, tp_size: int) -> None:
        self._sock = transport.bind(ctx, zmq.PULL, address)
        self._tp_size = tp_size
        self._parts: dict[int, dict[int, TransferResult]] = {}  # room -> rank -> its part
        self._links: dict[int, dict[str, str]] = {}  # each rank's data-plane links, as it last told
        self.registrations = RegistrationBarrier(tp_size)

    def link_states(self) -> dict[str, str]:
        """Every rank's data-plane links (each rank's reporter tells rank 0 of its own)."""
        return {
            f"rank {rank}: {peer}" if rank else peer: state
            for rank, links in sorted(self._links.items())
            for peer, state in links.items()
        }

    @property
    def open_rooms(self) -> int:
        """Rooms with some parts in and some not."""
        return len(self._parts)

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        """The rooms whose every part came in by ``timeout`` (notifier thread only)."""
        done: list[RoomResult] = []
        wait_ms = int(timeout * 1000)
        while self._sock.poll(wait_ms):  # the first waits; then what is queued already
            done += self._take(self._sock.recv())
            wait_ms = 0
        return done

    def _take(self, frame: bytes) -> list[RoomResult]:
        try:
            msg = decode(frame)
        except ProtocolError as e:
            logger.error("parts channel: dropped a bad frame: %s", e)
            return []
        if isinstance(msg, RegistrationPart):
            self.registrations.note(msg)
            return []
        if isinstance(msg, LinkStatesPart):
            self._links[msg.rank] = msg.states.links
            return []
        if not isinstance(msg, RoomPart) or not 0 <= msg.rank < self._tp_size:
            logger.error("parts channel: dropped %s", type(msg).__name__)
            return []
        room = msg.result.room
        parts = self._parts.setdefault(room, {})
        if msg.rank in parts:  # the rank's tables diverged (a duplicate room): the later one wins
            logger.warning("room %d: rank %d reported its part twice", room, msg.rank)
        parts[msg.rank] = msg.result
        if len(parts) < self._tp_size:
            return []
        del self._parts[room]
        return [combine(room, [(f"rank {r}", parts[r]) for r in range(self._tp_size)])]

    def close(self) -> None:
        self._sock.close(linger=0)


SUPERSEDED = "superseded by a later registration"


class RegistrationBarrier:
    """Rank 0 of a decode instance whose ranks receive their own heads: the other ranks'
    registrations, by prefill instance and attempt (the count of ``RegisterKVPeer``s naming it,
    the same on every rank), so that a registration is reported once every rank's is in."""

    def __init__(self, tp_size: int) -> None:
        self._others = set(range(1, tp_size))
        self._outcomes: dict[tuple[str, int], dict[int, KVPeerRegistered]] = {}  # (prefill, attempt)
        self._settled: dict[str, int] = {}  # by prefill instance: the last attempt decided
        self._changed = threading.Condition()

    def note(self, msg: RegistrationPart) -> None:
        prefill_addr = msg.outcome.prefill_addr
        with self._changed:
            if msg.attempt > self._settled.get(prefill_addr, 0):
                self._outcomes.setdefault((prefill_addr, msg.attempt), {})[msg.rank] = msg.outcome
                self._changed.notify_all()

    def wait(self, prefill_addr: str, attempt: int, timeout: float) -> str | None:
        """Wait for the other ranks' outcomes of ``attempt``: None when every one succeeded,
        ``SUPERSEDED`` when a later attempt was decided first, else why not."""
        key = (prefill_addr, attempt)

        def decided() -> bool:
            reported = self._outcomes.get(key, {}).keys()
            return self._is_settled(prefill_addr, attempt) or self._others <= reported

        with self._changed:
            arrived = self._changed.wait_for(decided, timeout)
            if self._is_settled(prefill_addr, attempt):
                return SUPERSEDED
            outcomes = self._outcomes.get(key, {})
            self._settle(prefill_addr, attempt)
        if not arrived:
            return f"ranks {sorted(self._others - outcomes.keys())} did not register within {timeout:.0f}s"
        failed = [f"rank {r}: {outcomes[r].error}" for r in sorted(self._others) if not outcomes[r].ok]
        return "; ".join(failed) or None

    def settle(self, prefill_addr: str, attempt: int) -> None:
        """``attempt`` is decided without the others (rank 0's own registration failed)."""
        with self._changed:
            self._settle(prefill_addr, attempt)

    def _is_settled(self, prefill_addr: str, attempt: int) -> bool:
        return attempt <= self._settled.get(prefill_addr, 0)

    def _settle(self, prefill_addr: str, attempt: int) -> None:
        """(Lock held.) Decided: its outcomes and those of earlier attempts are dropped, and
        earlier attempts still waiting are superseded."""
        self._settled[prefill_addr] = max(attempt, self._settled.get(prefill_addr, 0))
        for key in [k for k in self._outcomes if k[0] == prefill_addr and k[1] <= attempt]:
            del self._outcomes[key]
        self._changed.notify_all()


def combine(room: int, parts: Sequence[tuple[str, TransferResult | RoomResult]]) -> RoomResult:
    """One room's result from its parts, each named (``rank 1``): DONE with the first part's
    first token when every part is done, else FAILED naming the parts that failed."""
    failed = [(name, p) for name, p in parts if not p.ok]
    if not failed:
        first = parts[0][1]
        return RoomResult(room, TransferState.DONE, first.first_token, first.first_logprob)
    error = "; ".join(f"{name}: {p.error}" for name, p in failed)
    return RoomResult(room, TransferState.FAILED, error=error)
