"""The KV data plane's interface: transfer states and timeouts, room results, errors, and the
sender (prefill side) / receiver (decode side) contracts. The layout both sides must agree on
is ``protocol.dataplane.KVLayout`` (its torch helpers are in ``kvtransfer.layout``).

A *room* (an int minted by the front end) is one request's transfer. Both sides keep a
``RoomTable`` (``rooms.py``); a room's state only moves forward and ``FAILED`` sticks
(``TransferState.may_move_to`` is the rule, applied by the table to every move). Every room a
side adds ends in exactly one ``RoomResult`` returned by ``poll()``; after that the room is
forgotten and frames that still arrive for it are ignored. A result is the moment the pages
are yours again: on the prefill side the source pages may be freed or cached, on the decode
side the destination pages may be decoded from (``DONE``) or freed (``FAILED``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.config import ServerArgs
from protocol.dataplane import KVLayout, TokenLogprob, describe_mismatch
from protocol.security import ClusterKeys

if TYPE_CHECKING:
    import torch

    from kvtransfer.rooms import RoomTable

log = logging.getLogger("kvtransfer")


class TransferError(Exception):
    """Base of the errors this package raises."""


class LayoutMismatch(TransferError, ValueError):
    """The two sides (or a side and its own KV pool) disagree on ``field``."""

    def __init__(self, field_name: str, ours: Any, theirs: Any, where: str = "peer") -> None:
        super().__init__(describe_mismatch(field_name, ours, theirs, "this side", f"the {where}"))
        self.field = field_name


class DuplicateRoom(TransferError, ValueError):
    pass


class RegistrationRefused(TransferError):
    """The prefill side refused this decode side (the message names the mismatching field)."""


class TransferState(enum.IntEnum):
    """A room's state, in the only order it may move. Each non-final state has a timeout."""

    BOOTSTRAPPING = 0  # one side knows the room, the other has not confirmed it yet
    WAITING_FOR_INPUT = 1  # both sides know the room (and its destination pages); no page moved
    TRANSFERRING = 2  # pages are moving; the sender stays here until the receiver acknowledges
    DONE = 3
    FAILED = 4

    @property
    def final(self) -> bool:
        return self >= TransferState.DONE

    def may_move_to(self, new: TransferState) -> bool:
        """The one transition rule: forward only (or stay, to record progress), never out of
        a final state, so FAILED and DONE stick. ``RoomTable`` applies it to every move."""
        return not self.final and new >= self


@dataclass(frozen=True)
class TransferConfig:
    """Seconds a room may stay in each non-final state without progress, and peer liveness."""

    bootstrap_timeout: float = 30.0
    waiting_timeout: float = 30.0  # the prefill (queueing included) must start sending by then
    transfer_timeout: float = 30.0  # between two chunks, and from the last chunk to its ack
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0  # a peer silent this long is dead: its rooms fail
    keys: ClusterKeys | None = None  # CURVE keys of the link sockets (docs/design.md, "Security")

    @classmethod
    def uniform(cls, timeout: float, heartbeat_interval: float = 1.0, heartbeat_timeout: float = 5.0):
        return cls(timeout, timeout, timeout, heartbeat_interval, heartbeat_timeout)

    @classmethod
    def from_args(cls, args: ServerArgs) -> TransferConfig:
        """The data plane's timeouts and keys from the instance's flags."""
        timeouts = cls.uniform(args.transfer_timeout, args.heartbeat_interval, args.heartbeat_timeout)
        return dataclasses.replace(timeouts, keys=ClusterKeys.from_dir(args.cluster_key_dir))

    def timeout(self, state: TransferState) -> float:
        return {
            TransferState.BOOTSTRAPPING: self.bootstrap_timeout,
            TransferState.WAITING_FOR_INPUT: self.waiting_timeout,
            TransferState.TRANSFERRING: self.transfer_timeout,
        }[state]


@dataclass(frozen=True)
class RoomResult:
    """The one final outcome of a room on this side."""

    room: int
    state: TransferState  # DONE or FAILED
    first_token: int | None = None  # the first sampled token (decode side, DONE)
    first_logprob: TokenLogprob | None = None  # its logprob, when the prefill side computed it
    error: str | None = None  # why it failed

    @property
    def ok(self) -> bool:
        return self.state is TransferState.DONE


class _Side(ABC):
    """What both sides offer: their layout, state, results, shutdown."""

    layout: KVLayout  # this side's KV pool, as the peer must match it
    rooms: RoomTable

    def state(self, room: int) -> TransferState | None:
        """The room's state, or None when this side does not know it (any more)."""
        return self.rooms.state(room)

    def link_states(self) -> dict[str, str]:
        """Each data-plane link's state by peer (``LinkState`` values); {} for a backend without
        links of its own."""
        return {}

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        """Final results since the last call, each room exactly once. Non-blocking by default;
        with ``timeout`` > 0 waits (on a condition, not a spin) for the first result."""
        return self.rooms.poll(timeout)

    @abstractmethod
    def abort(self, room: int, reason: str = "aborted") -> None:
        """Abort ``room`` (idempotent; unknown or finished rooms are ignored). Its FAILED result
        comes through ``poll()`` once its pages are safe to reuse; the peer is told."""

    @abstractmethod
    def close(self) -> None:
        """Stop the background I/O and release sockets; live rooms are not reported."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVSender(_Side):
    """Prefill side. Binds ``address``; decode workers register with it.

    Call order for one request (room):
      1. ``add_room(room)`` when the prefill of a disaggregated request starts.
      2. After each prefill chunk's forward: ``send(room, src_pages, dst_pages)`` with the
         pages that chunk completed (source page ids on this side → destination page ids the
         decode side allocated). The last call passes ``first_token`` (the first sampled token,
         with its logprob when there is one) and the trailing partial page; it may carry no
         pages at all.
      3. ``poll()`` in the worker loop: a ``DONE`` result means the decode side acknowledged
         every page, so the source pages may be freed or cached; ``FAILED`` means they may be
         freed and the request failed (``error`` says why).
    ``abort(room)`` at any time. Sends may be issued before the decode side has announced the
    room; they are held and moved when it does.
    """

    address: str

    @abstractmethod
    def add_room(self, room: int) -> None:
        """Start tracking ``room``; raises DuplicateRoom if this side already has it."""

    @abstractmethod
    def send(
        self,
        room: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        first_token: int | None = None,
        first_logprob: TokenLogprob | None = None,
        staged: torch.Tensor | None = None,
    ) -> bool:
        """Queue the newly completed pages of ``room`` (``first_token`` marks the last send, and
        travels with its ``first_logprob`` when the prefill side has it). ``staged``: the
        pages already gathered, a host staging buffer of every head the layout advertises (a
        tensor-parallel instance's ranks gather them together: ``kvtransfer.tp_hub``); only the
        backends of ``TP_HUB_BACKENDS`` take it.
        Returns immediately; on CUDA the pages are read after the work already queued on the
        current stream (the forward that wrote them). Returns False, doing nothing, when the
        room is unknown or final (e.g. it failed a moment ago: its result is in ``poll()``)."""


class KVReceiver(_Side):
    """Decode side.

    Call order:
      1. At start-up, once per prefill worker: ``peer = register(prefill_address)`` (blocks
         until accepted; raises RegistrationRefused naming the mismatching field). A link
         lost later (the peer went silent, or dropped us) fails its rooms and registers again
         by itself once both sides are alive; rooms expected meanwhile fail at once.
      2. Per request: ``expect(room, peer, dst_pages)`` with the pages allocated for the part
         of the prompt the decode side does not have cached.
      3. ``poll()`` in the worker loop: ``DONE`` (with ``first_token`` and ``first_logprob``)
         means every destination page is written and the request may join the running batch;
         ``FAILED`` means the pages are no longer written by anyone and may be freed.
    ``abort(room)`` at any time.
    """

    @abstractmethod
    def register(self, address: str, timeout: float = 30.0) -> str:
        """Register with the prefill worker at ``address``; returns the peer id for ``expect``."""

    @abstractmethod
    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        """Announce ``room`` to ``peer`` with its destination pages; raises DuplicateRoom."""
