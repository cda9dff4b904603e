"""Fixtures for tests that run a scheduler over real ipc sockets (see loop_fakes.py)."""

from __future__ import annotations

import pytest
import zmq

from protocol import transport
from protocol.config import InstanceAddrs
from tests.fakes.scheduler_loop import FakeWorkerThread


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def addrs(ipc_dir):
    return InstanceAddrs(
        input_addr=transport.ipc_addr(ipc_dir, "input"),
        step_addr=transport.ipc_addr(ipc_dir, "step"),
        result_addr=transport.ipc_addr(ipc_dir, "result"),
    )


@pytest.fixture
def start_worker(ctx, addrs):
    started: list[FakeWorkerThread] = []

    def start(**kw):
        started.append(FakeWorkerThread(ctx, addrs, **kw))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()
