"""Suite-wide settings: processes started by tests use one torch thread each (2-core CI), and a
SIGTERM to pytest (a CI time limit) unwinds like Ctrl-C, so that every test's ``finally`` stops
the processes it started instead of leaving them behind."""

import os
import signal

os.environ.setdefault("PDSERVE_TORCH_THREADS", "1")


def pytest_configure(config) -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
