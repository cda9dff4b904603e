"""The faults of ``protocol.faults`` that a prefill worker honours, wired in once at start-up."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import torch

from kvtransfer import KVSender, RoomResult, TransferState
from protocol.dataplane import TokenLogprob
from protocol.faults import FAULTS_ENV, Faults

logger = logging.getLogger("pdserve.prefill_worker")

_Send = tuple[int, list[int], list[int], int | None, TokenLogprob | None, torch.Tensor | None]


class DelayedSender(KVSender):
    """A KV sender whose every ``send`` leaves ``delay`` seconds late, in order, from a thread of
    its own (``kv_send_delay_s``); everything else goes straight to the wrapped sender. Closing
    it lets the queued sends leave; the wrapped sender is closed by its owner."""

    def __init__(self, sender: KVSender, delay: float) -> None:
        self._sender = sender
        self._delay = delay
        self.address = sender.address
        self.layout = sender.layout
        self._queue: queue.Queue[tuple[float, _Send] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-delayed-sends", daemon=True)
        self._thread.start()

    def add_room(self, room: int) -> None:
        self._sender.add_room(room)

    def send(
        self,
        room: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        first_token: int | None = None,
        first_logprob: TokenLogprob | None = None,
        staged: torch.Tensor | None = None,
    ) -> bool:
        item = (room, list(src_pages), list(dst_pages), first_token, first_logprob, staged)
        self._queue.put((time.monotonic() + self._delay, item))
        return True

    def abort(self, room: int, reason: str = "aborted") -> None:
        self._sender.abort(room, reason)

    def state(self, room: int) -> TransferState | None:
        return self._sender.state(room)

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        return self._sender.poll(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            due, send = item
            time.sleep(max(due - time.monotonic(), 0.0))
            *args, staged = send
            self._sender.send(*args, staged=staged)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)


def with_faults(sender: KVSender, faults: Faults, name: str) -> KVSender:
    """``sender``, wrapped for the faults asked for (itself when none is)."""
    if faults.kv_send_delay_s > 0:
        logger.warning("%s: every KV send is delayed by %g s (%s)", name, faults.kv_send_delay_s, FAULTS_ENV)
        return DelayedSender(sender, faults.kv_send_delay_s)
    return sender
