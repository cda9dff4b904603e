"""Kernel tests run their Triton kernels under the interpreter in a child process; see
``interpreter_worker.py`` for why this process must not set ``TRITON_INTERPRET`` itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.engine.kernels.interpreter_worker import InterpreterWorker


@pytest.fixture(scope="session")
def interpreter() -> Iterator[InterpreterWorker]:
    worker = InterpreterWorker()
    yield worker
    worker.close()
