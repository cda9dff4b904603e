"""Suite-wide settings: processes started by tests use one torch thread each (2-core CI) and
keep what they derive from model files (``protocol.derived_cache``) in one directory of the
run, not the user's cache; a SIGTERM to pytest (a CI time limit) unwinds like Ctrl-C, so that
every test's ``finally`` stops the processes it started instead of leaving them behind."""

import atexit
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

from protocol import transport

os.environ.setdefault("PDSERVE_TORCH_THREADS", "1")
if "PDSERVE_CACHE_DIR" not in os.environ:
    os.environ["PDSERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdserve-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PDSERVE_CACHE_DIR"], True)


def pytest_configure(config) -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture
def ipc_dir() -> Iterator[str]:
    """A private directory for a test's ipc:// endpoints, removed after the test (short: ipc
    paths are limited to about 100 characters)."""
    path = transport.ipc_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
