"""The client outputs of one turn of the front end's loop, sent when the turn ends.

A turn reads every instance message that is queued (up to ``DRAIN_BUDGET_S``): one step's
outputs when the front end keeps up, several when it has fallen behind. What a request gets in a
turn leaves as one ``output``, its steps merged (text and token ids concatenated, the last
step's finish, usage and metrics), and the outputs of one connection's requests that asked for
``batch_outputs`` as one ``outputs`` frame: the cost of a send is paid once per request (or per
connection) and turn instead of once per token, so a front end that falls behind catches up
instead of falling further behind, as vLLM's output collector merges the deltas a slow consumer
has not taken yet. A client sees the same text and tokens in fewer, larger pieces.
"""

from __future__ import annotations

from protocol.messages import ClientOutput, ClientOutputs, Message


def merge(into: ClientOutput, later: ClientOutput) -> None:
    """Append ``later`` (the same streamed request's next output) to ``into``."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
    if later.logprobs is not None:
        into.logprobs = (into.logprobs or []) + later.logprobs
    if later.top_logprobs is not None:
        into.top_logprobs = (into.top_logprobs or []) + later.top_logprobs
    into.finished, into.finish_reason = later.finished, later.finish_reason
    into.usage, into.metrics = later.usage, later.metrics


class Outbox:
    """Per connection, per request (by internal rid, in order of first output): the merged output
    and whether it may share an ``outputs`` frame."""

    def __init__(self) -> None:
        self._pending: dict[bytes, dict[str, tuple[ClientOutput, bool]]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, conn: bytes, rid: str, msg: ClientOutput, batch_outputs: bool) -> None:
        outputs = self._pending.get(conn)
        if outputs is None:
            self._pending[conn] = {rid: (msg, batch_outputs)}
            return
        queued = outputs.get(rid)
        if queued is None:
            outputs[rid] = (msg, batch_outputs)
        else:
            merge(queued[0], msg)

    def take(self, conn: bytes) -> list[Message]:
        """The frames for ``conn`` (none left queued): the batched outputs in one, then each other
        output in its own."""
        outputs = self._pending.pop(conn, None)
        if outputs is None:
            return []
        batched = [msg for msg, batch in outputs.values() if batch]
        frames: list[Message] = [msg for msg, batch in outputs.values() if not batch]
        if batched:
            frames.insert(0, batched[0] if len(batched) == 1 else ClientOutputs(outputs=batched))
        return frames

    def connections(self) -> list[bytes]:
        return list(self._pending)
