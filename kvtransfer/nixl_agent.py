"""The NIXL side of the ``nixl`` backend: one NIXL agent per KV sender or receiver, the KV pool
registered with it, page descriptors built by array math, one-sided WRITEs, and the progress
that UCX needs on *both* sides of a write.

NIXL's own progress thread is off (``enable_prog_thread=False``: it spins, about 0.4 of a core
while idle). Progress is driven instead by the two sides: the writer posts a WRITE without
waiting (``post_write``) and polls it (``write_state``, never blocking) from its I/O loop, and
the target's ``Pump`` polls the agent only while the receiver may be written to, sleeping
``PUMP_INTERVAL_S`` between polls and blocking on a condition when idle (no CPU). Without
target-side progress a WRITE over UCX's tcp transport never completes.

On CPU pools the backend restricts UCX to ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=lo`` (same-host
deployments) unless the user set them; set them for a CPU deployment across hosts. Device pools
(``VRAM``) leave UCX free to pick NVLink / RDMA.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kvtransfer.base import TransferError

log = logging.getLogger("kvtransfer.nixl")

NIXL_MODULES = ("nixl_cu12", "nixl_cu13", "nixl")  # the wheels' import names, most common first
CPU_UCX_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
QUIET_ENV = {"NIXL_LOG_LEVEL": "WARN"}  # its INFO lines go to stdout, which children may use
PUMP_INTERVAL_S = 0.0002
IN_PROGRESS, DONE = "PROC", "DONE"  # NIXL's transfer states; anything else is an error


class NixlUnavailable(TransferError, ImportError):
    pass


def import_nixl() -> ModuleType:
    """The installed NIXL Python package; raises NixlUnavailable saying how to install it."""
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise NixlUnavailable(
        "the nixl KV transfer backend needs NIXL: pip install 'pdserve[nixl]' (the nixl-cu12 wheel; "
        "install torch first so that no CUDA torch is pulled)"
    )


def nixl_available() -> bool:
    """Whether a NIXL package is installed (found, not loaded)."""
    return any(importlib.util.find_spec(name) is not None for name in NIXL_MODULES)


def set_ucx_env(on_device: bool) -> None:
    """UCX reads its environment once, when the first agent of the process starts."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not on_device:
        for key, value in CPU_UCX_ENV.items():
            os.environ.setdefault(key, value)


def page_rows(addresses: Sequence[int], num_pages: int, page_bytes: int, device_id: int) -> np.ndarray:
    """NIXL descriptors ``(address, bytes, device)`` of every page of every array, array-major:
    page ``p`` of array ``a`` is row ``a * num_pages + p``."""
    return slot_rows(addresses, range(num_pages), SlotSlice(page_bytes, 0, page_bytes), 1, device_id)


def page_indices(pages: Sequence[int], num_arrays: int, num_pages: int) -> np.ndarray:
    """Rows of ``page_rows`` holding ``pages`` in every array (array-major, pages in order)."""
    arrays = np.arange(num_arrays, dtype=np.int64)[:, None] * num_pages
    return (arrays + np.asarray(pages, dtype=np.int64)[None, :]).reshape(-1).astype(np.int32)


@dataclass(frozen=True)
class SlotSlice:
    """``length`` bytes at ``offset`` of each token slot (``slot_bytes`` apart) of a page (a head
    slice of a pool laid out [page, slot, head, dim])."""

    slot_bytes: int
    offset: int
    length: int


def slot_rows(
    addresses: Sequence[int], pages: Sequence[int], where: SlotSlice, page_size: int, device_id: int
) -> np.ndarray:
    """NIXL descriptors of ``where`` in every slot of ``pages`` of every array (each array's
    pages ``page_size * slot_bytes`` apart): array-major, then page, then slot."""
    page_bytes = np.uint64(page_size * where.slot_bytes)
    starts = np.asarray(addresses, dtype=np.uint64)[:, None, None] + np.uint64(where.offset)
    page_offsets = np.asarray(pages, dtype=np.uint64)[None, :, None] * page_bytes
    slot_offsets = np.arange(page_size, dtype=np.uint64)[None, None, :] * np.uint64(where.slot_bytes)
    addrs = (starts + page_offsets + slot_offsets).reshape(-1)
    rows = np.empty((addrs.size, 3), dtype=np.uint64)
    rows[:, 0], rows[:, 1], rows[:, 2] = addrs, where.length, device_id
    return rows


class Agent:
    """A NIXL agent over one KV pool (its ``2 * L`` contiguous page arrays), registered at start.
    Not thread-safe: the sender uses it from its I/O thread only; the receiver under ``lock``."""

    def __init__(self, name: str, arrays: Sequence[torch.Tensor]) -> None:
        first = arrays[0]
        on_device = first.device.type == "cuda"
        set_ucx_env(on_device)
        nixl = import_nixl()
        self.name = name
        self.lock = threading.Lock()
        self.memory = "VRAM" if on_device else "DRAM"
        self.device_id = (first.device.index or 0) if on_device else 0
        self.num_arrays, self.num_pages = len(arrays), first.shape[0]
        self.page_bytes = first[0].numel() * first.element_size()
        self.addresses = [t.data_ptr() for t in arrays]
        config = nixl.nixl_agent_config(
            enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"]
        )
        self._agent: Any = nixl.nixl_agent(name, config)
        if "UCX" not in self._agent.backends:
            raise TransferError("NIXL has no UCX backend plugin here; the nixl backend needs it")
        self._registered = self._agent.register_memory(list(arrays))
        rows = page_rows(self.addresses, self.num_pages, self.page_bytes, self.device_id)
        self._local = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows, self.memory)
        self._closed = False

    def metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes, rows: np.ndarray | None, memory: str) -> tuple[str, Any]:
        """Load a remote agent and prepare its descriptors ``rows`` (None: descriptors are made
        per WRITE, ``post_rows``); returns (its name, the prepared list or None)."""
        name = self._agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        if rows is None:
            return name, None
        try:
            return name, self._agent.prep_xfer_dlist(name, rows, memory)
        except Exception:
            self._agent.remove_remote_agent(name)
            raise

    def remove_peer(self, name: str, descs: Any) -> None:
        if descs is not None:
            descs.release()
        self._agent.remove_remote_agent(name)

    def post_write(self, peer: str, descs: Any, local: np.ndarray, remote: np.ndarray) -> Any:
        """Post a WRITE of local descriptor rows ``local`` into the peer's prepared rows ``remote``
        and return at once: its handle, to poll with ``write_state`` and give back with
        ``release``. Raises TransferError (the handle released) if NIXL cannot prepare or post it."""
        agent = self._agent
        return self._post(peer, lambda: agent.make_prepped_xfer("WRITE", self._local, local, descs, remote))

    def post_rows(self, peer: str, local: np.ndarray, remote: np.ndarray, memory: str) -> Any:
        """As ``post_write``, from descriptors made for this WRITE: ``local`` rows of our pool
        into the ``remote`` rows of the peer's (its ``memory`` kind), row for row."""

        def make() -> Any:
            agent = self._agent
            ours, theirs = agent.get_xfer_descs(local, self.memory), agent.get_xfer_descs(remote, memory)
            return agent.initialize_xfer("WRITE", ours, theirs, peer)

        return self._post(peer, make)

    def _post(self, peer: str, make: Callable[[], Any]) -> Any:
        try:
            handle = make()
        except Exception as e:  # NIXL's errors derive from Exception only
            raise TransferError(f"NIXL could not prepare a WRITE to {peer}: {e}") from None
        try:
            state = self._agent.transfer(handle)
        except Exception as e:  # e.g. NIXL_ERR_REMOTE_DISCONNECT: the peer process is gone
            state = str(e) or type(e).__name__
        if state not in (IN_PROGRESS, DONE):
            release(handle)
            raise TransferError(write_failure(peer, state))
        return handle

    def write_state(self, handle: Any) -> str:
        """``DONE`` (UCX flushed: the data is in the peer's memory), ``PROC`` (in progress), or
        what went wrong. Never blocks; each call also drives UCX's progress on this side."""
        try:
            return str(self._agent.check_xfer_state(handle))
        except Exception as e:  # e.g. NIXL_ERR_REMOTE_DISCONNECT
            return str(e) or type(e).__name__

    def progress(self) -> None:
        """Let UCX move the data that peers write here (polling notifications drives it)."""
        for peer, notes in self._agent.get_new_notifs().items():
            log.debug("ignoring %d NIXL notifications from %s", len(notes), peer)

    def close(self) -> None:
        """Deregister the pool and destroy the NIXL agent now. Left to the garbage collector, the
        agent (in a reference cycle of its owners) was destroyed at a random later moment, and
        UCX's worker teardown then completed WRITEs still queued to a dead peer against memory
        registrations already gone: a segmentation fault in whichever thread collected it."""
        if self._closed:
            return
        self._closed = True
        release(self._local)
        try:
            self._agent.deregister_memory(self._registered)
        except Exception as e:  # closing must not raise; the process may be going away
            log.warning("NIXL agent %s: deregistering the KV pool failed: %s", self.name, e)
        self._agent = self._local = self._registered = None  # NIXL's handles keep its agent alive


def release(handle: Any) -> bool:
    """Give a NIXL handle back; a transfer still in progress is cancelled. False when NIXL
    refuses (a transfer it cannot cancel: it must be polled until it stops, then released)."""
    try:
        handle.release()
    except Exception as e:
        log.warning("NIXL could not release %r: %s", handle, e)
        return False
    return True


def write_failure(peer: str, state: str) -> str:
    return f"NIXL WRITE to {peer} failed ({state}): the peer died or dropped us"


class Pump:
    """Drives a receiver's agent progress while ``busy`` > 0 (rooms that may be written to)."""

    def __init__(self, agent: Agent, name: str) -> None:
        self._agent = agent
        self._cond = threading.Condition()
        self._busy = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def hold(self) -> None:
        with self._cond:
            self._busy += 1
            self._cond.notify()

    def drop(self, count: int = 1) -> None:
        with self._cond:
            self._busy = max(0, self._busy - count)

    @property
    def busy(self) -> int:
        return self._busy

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                with self._agent.lock:
                    self._agent.progress()
            except Exception:  # keep pumping: one failed poll must not stop every transfer
                log.exception("NIXL progress failed")
            time.sleep(PUMP_INTERVAL_S)
