"""Signals aimed at one thread of another process: the kernel may hand a process-directed signal
to any of its threads, and a process must stop whichever thread gets it."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import pytest

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread ``tid`` of process ``pid`` (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL[platform.machine()], pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


def skip_without_tgkill() -> None:
    if not sys.platform.startswith("linux") or platform.machine() not in SYS_TGKILL:
        pytest.skip("tgkill is Linux-only")


def other_thread(pid: int) -> int:
    """A thread of ``pid`` that is not its main thread."""
    return next(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
