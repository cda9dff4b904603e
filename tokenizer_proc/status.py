"""Client ``status`` and ``metrics`` requests: ask every instance, answer once all replied or time
ran out."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import zmq

from protocol.messages import ClientStatus, InstanceMetrics, InstanceStatus, StatusQuery, StatusReport
from tokenizer_proc.instances import Instance, InstancePool
from tokenizer_proc.metrics import InstanceSample

log = logging.getLogger("pdserve.frontend")


@dataclass(eq=False)
class PendingStatus:
    conn: bytes
    rid: str
    deadline: float
    instances: list[Instance]
    answers: list[InstanceStatus | None]
    wants_metrics: bool = False  # a client ``metrics`` request: the reports carry InstanceMetrics
    metrics: list[InstanceMetrics | None] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(a is not None for a in self.answers)

    def reply(self, ready: bool) -> ClientStatus:
        """The answer; an instance that did not answer is reported as not alive."""
        pairs = zip(self.answers, self.instances, strict=True)
        statuses = [a if a is not None else inst.unknown_status() for a, inst in pairs]
        model = next((inst.model for inst in self.instances if inst.model is not None), None)
        return ClientStatus(rid=self.rid, ready=ready, instances=statuses, model=model)

    def samples(self) -> list[InstanceSample]:
        """Each instance (by name, or address before it first reported) with the metrics it
        reported (None: it did not answer in time)."""
        pairs = zip(self.instances, self.metrics, strict=True)
        return [InstanceSample(inst.name or inst.addr, inst.role, metrics) for inst, metrics in pairs]


class StatusCollector:
    def __init__(self, reply_to: str) -> None:
        self._reply_to = reply_to  # this front end's output address: the reports come back here only
        self._qids = itertools.count(1)
        self._queries: dict[int, tuple[PendingStatus, int]] = {}  # qid -> (pending, instance index)
        self._pending: list[PendingStatus] = []

    def start(
        self, conn: bytes, rid: str, pool: InstancePool, deadline: float, metrics: bool = False
    ) -> PendingStatus:
        """Query every live instance (for its metrics too, if ``metrics``); dead ones are
        answered at once from what is known."""
        n = len(pool)
        pending = PendingStatus(conn, rid, deadline, list(pool), [None] * n, metrics, [None] * n)
        for i, inst in enumerate(pool):
            if not inst.alive:
                pending.answers[i] = inst.unknown_status()
                continue
            qid = next(self._qids)
            try:
                inst.send(StatusQuery(qid=qid, metrics=metrics, reply_to=self._reply_to))
            except zmq.Again:
                log.warning("status query to %s not sent (queue full)", inst.name)
                continue
            self._queries[qid] = (pending, i)
        if not pending.complete:
            self._pending.append(pending)
        return pending

    def answer(self, report: StatusReport) -> PendingStatus | None:
        """Record one instance's report; return its request when that completed it."""
        entry = self._queries.pop(report.qid, None)
        if entry is None:
            return None  # answered after its deadline
        pending, i = entry
        pending.answers[i] = report.status
        pending.metrics[i] = report.metrics
        if not pending.complete:
            return None
        self._pending.remove(pending)
        return pending

    def expired(self, now: float) -> list[PendingStatus]:
        done = [p for p in self._pending if now >= p.deadline]
        if done:
            self._pending = [p for p in self._pending if now < p.deadline]
            gone = {id(p) for p in done}
            self._queries = {q: e for q, e in self._queries.items() if id(e[0]) not in gone}
        return done

    @property
    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending), default=None)
