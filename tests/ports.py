"""TCP ports for the processes a test starts.

Picked below the kernel's ephemeral range: a port the OS chose (``bind(0)``) is free only until
any connection's source port or another ``bind(0)`` takes it, and a test binds its port only
seconds later, in another process. Below the range nothing takes a port by chance. A front end
also binds ``port + 1`` (its output address), so ports come in runs of ``count``. A port is
handed out once per test process: deployments started together pick theirs before any binds.
"""

from __future__ import annotations

import random
import socket
import threading

_rng = random.Random()
_given: set[int] = set()  # by this process (deployments may start at once, on threads)
_lock = threading.Lock()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_tcp_port(host: str = "127.0.0.1", count: int = 2) -> int:
    """A port ``p`` such that ``p .. p + count - 1`` can all be bound now."""
    high = _ephemeral_start() - count
    low = min(10000, high // 2)
    with _lock:
        for _ in range(1000):
            port = _rng.randrange(low, high)
            run = range(port, port + count)
            if _given.isdisjoint(run) and all(_bindable(host, p) for p in run):
                _given.update(run)
                return port
    raise RuntimeError(f"no {count} free consecutive TCP ports on {host} in {low}..{high}")
