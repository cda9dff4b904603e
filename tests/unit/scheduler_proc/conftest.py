"""Fixtures for tests that run a scheduler over real ipc sockets (see loop_fakes.py)."""

from __future__ import annotations

import shutil

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
def addrs():
    directory = transport.ipc_dir()
    yield InstanceAddrs(
        input_addr=transport.ipc_addr(directory, "input"),
        step_addr=transport.ipc_addr(directory, "step"),
        result_addr=transport.ipc_addr(directory, "result"),
    )
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_worker(ctx, addrs):
    started: list[FakeWorkerThread] = []

    def start(**kw):
        started.append(FakeWorkerThread(ctx, addrs, **kw))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()
