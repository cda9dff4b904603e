"""Process-lifetime helpers shared by every pdserve process."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent exits, so no child outlives a
    crashed launcher. No-op on other systems."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(0), so ``finally`` blocks close sockets on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
