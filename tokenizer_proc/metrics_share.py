"""The front-end metrics of a deployment with several front ends (``--tokenizer-worker-num``).

Each front end counts what it sees (``FrontendMetrics``), but a scrape reaches whichever HTTP
server the kernel gave the connection to, and must show the whole deployment. So each front end
publishes its values, as one float64 vector (``FrontendMetrics.to_vector``), in a memory-mapped
file of its own in a directory the launcher gives them all (its private one), at the end of every
turn of its loop that changed them (a few µs: at most one publication per batch of outputs); the
front end that answers a scrape adds the others' vectors to its own values. The front ends of a
deployment run on one host, started by one launcher; a dead one stops the deployment.

Slot 0 of a vector is a sequence number, odd while its owner writes the rest: a reader retries a
copy taken during a write (a seqlock; the owner is one thread, and x86 keeps stores in order).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from protocol.config import FrontendSiblings
from tokenizer_proc.metrics import FrontendMetrics

log = logging.getLogger("pdserve.frontend")

READ_TRIES = 1000  # copies of a vector tried while its owner is mid-write (one write takes µs)


def metrics_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"frontend{index}.metrics")


class MetricsShare:
    """This front end's published vector, and the siblings' as last found."""

    def __init__(self, siblings: FrontendSiblings, metrics: FrontendMetrics) -> None:
        self._siblings = siblings
        self._metrics = metrics
        self._size = 1 + len(metrics.to_vector())
        self._mine = self._create(metrics_path(siblings.metrics_dir, siblings.index))
        self._others: dict[int, np.memmap] = {}
        self._published: tuple[int, int] | None = None
        self.publish_changes()

    def _create(self, path: str) -> np.memmap:
        """Written whole under a temporary name, then renamed: a sibling finds no file or a full one."""
        tmp = f"{path}.tmp"
        vector = np.memmap(tmp, dtype=np.float64, mode="w+", shape=(self._size,))
        os.replace(tmp, path)
        return vector

    def publish_changes(self) -> None:
        """Publish if anything was counted since the last time: every output counts generated
        tokens or ends its request (a final output counts a finish reason)."""
        m = self._metrics
        mark = (m.generation_tokens, sum(m.finished.values()))
        if mark == self._published:
            return
        self._published = mark
        vector = self._mine
        seq = vector[0]
        vector[0] = seq + 1
        vector[1:] = m.to_vector()
        vector[0] = seq + 2

    def deployment_metrics(self) -> FrontendMetrics:
        """This front end's metrics plus every sibling's last published ones (a sibling that has
        not published yet counts as zero)."""
        total = np.asarray(self._metrics.to_vector(), dtype=np.float64)
        for index in range(self._siblings.count):
            if index != self._siblings.index and (values := self._read(index)) is not None:
                total += values
        return FrontendMetrics.from_vector(total.tolist())

    def _read(self, index: int) -> np.ndarray | None:
        vector = self._others.get(index)
        if vector is None and (vector := self._open(index)) is None:
            return None
        for _ in range(READ_TRIES):
            seq = vector[0]
            if seq % 2 == 0:
                values = np.array(vector[1:])
                if vector[0] == seq:
                    return values
        log.warning("front end %d's metrics were being written through %d reads; left out", index, READ_TRIES)
        return None

    def _open(self, index: int) -> np.memmap | None:
        path = metrics_path(self._siblings.metrics_dir, index)
        try:
            vector = np.memmap(path, dtype=np.float64, mode="r")
        except (FileNotFoundError, ValueError):  # not published yet
            return None
        if vector.shape != (self._size,):
            log.error("front end %d's metrics file %s has %d values, expected %d; left out",
                      index, path, vector.shape[0], self._size)
            return None
        self._others[index] = vector
        return vector
