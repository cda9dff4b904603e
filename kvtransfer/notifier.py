"""Messages from a disaggregated worker to its scheduler from threads other than the step loop,
on one locked socket: the data plane's room results and link states (polled from the KV sender
or receiver by a thread of its own) and whatever else the worker ``notify``s (e.g. the decode
side's registration outcomes)."""

from __future__ import annotations

import threading

import zmq

from kvtransfer.base import KVReceiver, KVSender
from protocol import transport
from protocol.messages import KVLinkStates, LinkStatesPart, Message, RoomPart, TransferResult

RESULT_POLL_S = 0.1  # the thread's wait per poll (bounds how long stopping it takes)


class Notifier:
    """``rank``: report each room result and the link states as that tensor-parallel rank's, to
    its rank 0 (``kvtransfer.tp_parts``)."""

    def __init__(
        self, ctx: zmq.Context, result_addr: str, side: KVSender | KVReceiver, linger_ms: int,
        rank: int | None = None,
    ) -> None:
        self._sock = transport.connect(ctx, zmq.PUSH, result_addr)
        self._lock = threading.Lock()
        self._side = side
        self._linger_ms = linger_ms
        self._rank = rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-results", daemon=True)
        self._thread.start()

    def notify(self, msg: Message) -> None:
        """Send ``msg``; dropped once closed (a registration thread may still end later)."""
        with self._lock:
            if not self._sock.closed:
                transport.send(self._sock, msg)

    def _run(self) -> None:
        links: dict[str, str] = {}
        while not self._stop.is_set():
            for r in self._side.poll(RESULT_POLL_S):
                result = TransferResult(r.room, r.ok, r.first_token, r.error or "", r.first_logprob)
                self.notify(result if self._rank is None else RoomPart(self._rank, result))
            if (now := self._side.link_states()) != links:
                links = now
                states = KVLinkStates(links)
                self.notify(states if self._rank is None else LinkStatesPart(self._rank, states))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        with self._lock:
            self._sock.close(linger=self._linger_ms)
