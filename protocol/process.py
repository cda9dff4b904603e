"""Process-lifetime helpers shared by every pdserve process."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
from typing import Protocol, TypeVar

from protocol.config import config_from_json

T = TypeVar("T")

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


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack to stderr: how to see where a
    process that will not stop is stuck."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


class StopRequest(Protocol):
    """What a serving loop polls to know it should stop (a ``threading.Event`` in tests)."""

    def is_set(self) -> bool: ...


class StopFlag:
    """A stop request set by a signal handler. A plain attribute, not a ``threading.Event``: the
    handler runs in the main thread between two bytecodes, possibly while that thread holds the
    Event's lock (or inside another handler that does), and would wait for itself forever."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def stop_on_sigterm() -> StopFlag:
    """A stop request that SIGTERM and SIGINT set, for a process that stops its loop itself."""
    flag = StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: flag.set())
    return flag


class SignalWakeup:
    """A wait that a signal ends at once, whichever thread the kernel gives it to.

    Python's signal module writes the signal number to a wakeup fd from its C-level handler, so
    a ``select`` on the other end returns at once. Pair it with handlers that take no lock (see
    ``StopFlag``): launch's supervisor once set a ``threading.Event`` from its SIGCHLD handler
    and deadlocked when the children exited together."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def install(self) -> None:
        """From the main thread: signals from now on end a ``wait``."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def wait(self, timeout_s: float) -> None:
        if select.select([self._reader], [], [], timeout_s)[0]:
            with contextlib.suppress(BlockingIOError):
                while self._reader.recv(4096):
                    pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(0), so ``finally`` blocks close sockets on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


def start_process(prog: str, config_cls: type[T], description: str | None, *,
                  argv: list[str] | None = None, sigterm_exits: bool = True) -> T:
    """The common start of every pdserve process: parse ``--config`` (the role's config as
    JSON), log under the process's name, die with the parent, and unless the process handles
    SIGTERM itself (``sigterm_exits=False``), turn SIGTERM into a clean exit."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"{config_cls.__name__} as JSON")
    cfg = config_from_json(config_cls, parser.parse_args(argv).config)
    name = getattr(cfg, "name", prog.split()[-1])
    logging.basicConfig(
        level=cfg.args.log_level.upper(),  # type: ignore[attr-defined]
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
    )
    die_with_parent()
    dump_stacks_on_sigusr1()
    if sigterm_exits:
        exit_on_sigterm()
    return cfg
