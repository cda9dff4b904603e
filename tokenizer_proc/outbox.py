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


def _per_token(values: list | None, tokens: int) -> bool:
    return values is None or len(values) == tokens


def mergeable(into: ClientOutput, later: ClientOutput) -> bool:
    """Whether ``later`` can be appended to ``into`` with every logprob and top-logprob list still
    one entry per token: both carry the same lists, and each list has an entry for each of its
    output's tokens (a token can come without its logprob, e.g. a decode instance's first)."""
    first, second = len(into.token_ids), len(later.token_ids)
    return all(
        (a is None) == (b is None) and _per_token(a, first) and _per_token(b, second)
        for a, b in ((into.logprobs, later.logprobs), (into.top_logprobs, later.top_logprobs))
    )


def merge(into: ClientOutput, later: ClientOutput) -> None:
    """Append ``later`` (the same streamed request's next output, ``mergeable``) to ``into``. The
    lists of a streamed output are its own: extended in place."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
    if into.logprobs is not None and later.logprobs is not None:
        into.logprobs.extend(later.logprobs)
    if into.top_logprobs is not None and later.top_logprobs is not None:
        into.top_logprobs.extend(later.top_logprobs)
    into.finished, into.finish_reason = later.finished, later.finish_reason
    into.usage, into.metrics = later.usage, later.metrics


class Outbox:
    """Per connection, per request (by internal rid, in order of first output): its outputs (one
    unless two could not be merged) and whether they may share an ``outputs`` frame."""

    def __init__(self) -> None:
        self._pending: dict[bytes, dict[str, tuple[list[ClientOutput], bool]]] = {}

    def add(self, conn: bytes, rid: str, msg: ClientOutput, batch_outputs: bool) -> None:
        outputs = self._pending.setdefault(conn, {})
        queued = outputs.get(rid)
        if queued is None:
            outputs[rid] = ([msg], batch_outputs)
        elif mergeable(queued[0][-1], msg):
            merge(queued[0][-1], msg)
        else:
            queued[0].append(msg)

    def take(self, conn: bytes) -> list[Message]:
        """The frames for ``conn`` (none left queued): the batched outputs in one, then each other
        output in its own; a request's outputs in their order."""
        outputs = self._pending.pop(conn, None)
        if outputs is None:
            return []
        batched = [msg for msgs, batch in outputs.values() if batch for msg in msgs]
        frames: list[Message] = [msg for msgs, batch in outputs.values() if not batch for msg in msgs]
        if batched:
            frames.insert(0, batched[0] if len(batched) == 1 else ClientOutputs(outputs=batched))
        return frames

    def connections(self) -> list[bytes]:
        return list(self._pending)
