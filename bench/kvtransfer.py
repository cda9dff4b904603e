"""Benchmark the KV transfer backends: one request's KV from a prefill process to a decode process.

Full shape: a 4096-token request of a Llama-3-8B-shaped model (32 layers, 8 KV heads, head dim
128, bf16, page size 16): 256 pages, 512 MiB. This process is the decode side; each backend's
prefill side runs in a child process (``--serve-prefill``). One repetition times, on the prefill
side, from the first ``send`` to the decode side's acknowledgement, after both sides know the
room; the first repetition is a warm-up and is not counted. The decode side checks every page
of the last repetition against the prefill pool (regenerated from its seed). Next to each
backend: the device-to-device copy rate of the same bytes measured in the same run. nixl runs
twice: whole pages, and as rank 1 of a decode instance of ``--tp-size 2`` (half the KV heads,
written as a head slice of each token slot: ``kvtransfer.tp_slices``); its GB/s counts the
bytes that rank receives.

``python -m bench.kvtransfer --output bench/results/kvtransfer.json``          (GPU)
``python -m bench.kvtransfer --tiny --output /tmp/kvtransfer.json``            (CPU smoke test)
``python -m bench.kvtransfer --tokens 512``                                     (8B shape on CPU)

zmq runs over ``tcp://127.0.0.1`` (as between hosts) and ``ipc://``; nixl writes over UCX (its
control frames on ``tcp://``; on CPU ``UCX_TLS=tcp`` unless set: try ``UCX_TLS=sm,tcp``) when
the nixl-cu12 package is installed; cuda_ipc needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from kvtransfer import KVLayout, TransferConfig, TransferState, make_backend
from kvtransfer.nixl_agent import CPU_UCX_ENV, nixl_available
from protocol.dataplane import kv_head_range

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
CONFIG = TransferConfig.uniform(120.0, heartbeat_interval=1.0, heartbeat_timeout=60.0)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str
    tokens: int

    @property
    def pages(self) -> int:
        return -(-self.tokens // self.page_size)

    def layout(self, backend: str) -> KVLayout:
        dims = (self.num_layers, self.page_size, self.num_kv_heads, self.head_dim)
        return KVLayout("bench", *dims, self.dtype, backend)

    def heads_of(self, split: Split | None) -> range:
        """The KV heads a decode rank of ``split`` holds (every head without one)."""
        if split is None:
            return range(self.num_kv_heads)
        start, count = kv_head_range(self.num_kv_heads, split.tp_size, split.tp_rank)
        return range(start, start + count)


@dataclass(frozen=True)
class Split:
    """The decode side as one rank of a tensor-parallel instance."""

    tp_size: int
    tp_rank: int


FULL = Shape(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16", tokens=4096)
TINY = Shape(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32", tokens=64)


@dataclass
class Row:
    backend: str
    transport: str
    reps: int
    median_ms: float
    min_ms: float
    gbps: float  # request KV bytes / median time
    vs_d2d: float  # gbps / the device-to-device copy rate
    verified: bool


@dataclass
class Report:
    device: str
    shape: dict
    request_bytes: int
    d2d_copy_gbps: float
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def make_pool(
    shape: Shape, device: str, seed: int | None, heads: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pool of ``pages + 1`` pages (page 0 is padding): random from ``seed``, or zeros; of
    ``heads`` KV heads (default: the shape's)."""
    heads = shape.num_kv_heads if heads is None else heads
    dims = (2 * shape.num_layers, shape.pages + 1, shape.page_size, heads, shape.head_dim)
    dtype = getattr(torch, shape.dtype)
    if seed is None:
        data = torch.zeros(dims, dtype=dtype, device=device)
    else:
        g = torch.Generator(device=device).manual_seed(seed)
        data = torch.randn(dims, generator=g, device=device).to(dtype)
    arrays = list(data.unbind(0))
    return arrays[0::2], arrays[1::2]


def page_lists(shape: Shape) -> tuple[list[int], list[int]]:
    """Source and destination pages: both shuffled, as a real page allocator leaves them."""
    g = torch.Generator().manual_seed(SEED)
    src = (torch.randperm(shape.pages, generator=g) + 1).tolist()
    dst = (torch.randperm(shape.pages, generator=g) + 1).tolist()
    return src, dst


def d2d_copy_gbps(nbytes: int, device: str, reps: int = 10) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Prefill side (child process)
# --------------------------------------------------------------------------------------------


def serve_prefill(spec: dict) -> None:
    """Send the request ``reps`` times; print the per-repetition seconds as one JSON line."""
    shape, device = Shape(**spec["shape"]), spec["device"]
    torch.set_num_threads(1)
    k, v = make_pool(shape, device, SEED)
    src, dst = page_lists(shape)
    per_send = max(1, spec["chunk_tokens"] // shape.page_size)
    sender = make_backend(spec["backend"], "prefill", shape.layout(spec["backend"]), k, v,
                          address=spec["address"], config=CONFIG)
    times = []
    try:
        for room in range(spec["reps"]):
            sender.add_room(room)
            wait_for_state(sender, room, TransferState.WAITING_FOR_INPUT)
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, shape.pages, per_send):
                first_token = 1 if i + per_send >= shape.pages else None  # the last send
                sender.send(room, src[i : i + per_send], dst[i : i + per_send], first_token=first_token)
            (result,) = sender.poll(timeout=120.0)
            times.append(time.perf_counter() - t0)
            if not result.ok:
                raise RuntimeError(f"room {room} failed: {result.error}")
    finally:
        sender.close()
    print(json.dumps(times), flush=True)


def wait_for_state(side, room: int, state: TransferState, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while side.state(room) != state:
        if time.monotonic() > end:
            raise TimeoutError(f"room {room} never reached {state.name}")
        time.sleep(0.0005)


# --------------------------------------------------------------------------------------------
# Decode side (this process)
# --------------------------------------------------------------------------------------------


def run_backend(
    backend: str, address: str, shape: Shape, device: str, reps: int, chunk_tokens: int,
    split: Split | None = None,
) -> tuple:
    spec = {"backend": backend, "address": address, "shape": asdict(shape), "device": device,
            "reps": reps, "chunk_tokens": chunk_tokens}
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.kvtransfer", "--serve-prefill", json.dumps(spec)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    heads = shape.heads_of(split)
    k, v = make_pool(shape, device, None, len(heads))
    _, dst = page_lists(shape)
    layout, pool_layout = shape.layout(backend), None
    if split is not None:
        pool_layout = replace(layout, num_kv_heads=len(heads))
        layout = replace(layout, tp_size=split.tp_size, tp_rank=split.tp_rank)
    receiver = make_backend(backend, "decode", layout, k, v, config=CONFIG, pool_layout=pool_layout)
    try:
        peer = receiver.register(address, timeout=120.0)
        for room in range(reps):
            receiver.expect(room, peer, dst)
            (result,) = receiver.poll(timeout=120.0)
            if not result.ok:
                raise RuntimeError(f"{backend}: room {room} failed: {result.error}")
        out, _ = child.communicate(timeout=300)
    finally:
        receiver.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{backend}: the prefill process exited with {child.returncode}")
    return json.loads(out.strip().splitlines()[-1]), verify(shape, device, k, v, heads)


def verify(shape: Shape, device: str, k: list[torch.Tensor], v: list[torch.Tensor], heads: range) -> bool:
    src_k, src_v = make_pool(shape, device, SEED)
    src, dst = page_lists(shape)
    pairs = zip(src_k + src_v, k + v, strict=True)
    held = slice(heads.start, heads.stop)
    return all(torch.equal(a[src][:, :, held].view(torch.uint8), b[dst].view(torch.uint8)) for a, b in pairs)


Run = tuple[str, str, Split | None]  # transport, address, the decode side's split


def runs(backend: str, transports: list[str], workdir: str, device: str) -> list[Run]:
    """What to measure of ``backend``; cuda_ipc and nixl carry only control frames on their
    addresses (ipc:// and tcp:// respectively): their transport is how the pages move."""
    if backend == "cuda_ipc":
        return [("ipc", f"ipc://{workdir}/cuda-ipc.sock", None)]
    if backend == "nixl":
        ucx = f"ucx:{os.environ.get('UCX_TLS', CPU_UCX_ENV['UCX_TLS'] if device == 'cpu' else 'auto')}"
        return [(ucx, f"tcp://127.0.0.1:{_free_port()}", split) for split in (None, Split(2, 1))]
    named = {"tcp": f"tcp://127.0.0.1:{_free_port()}", "ipc": f"ipc://{workdir}/zmq.sock"}
    return [(t, named[t], None) for t in transports]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(report: Report) -> None:
    mib = report.request_bytes / (1 << 20)
    print(f"\nKV of one request: {mib:.1f} MiB on {report.device}; "
          f"device-to-device copy: {report.d2d_copy_gbps:.1f} GB/s")
    print(f"{'backend':<10} {'transport':<30} {'reps':>4} {'median ms':>10} {'min ms':>9} {'GB/s':>8} "
          f"{'vs d2d':>7} verified")
    for r in report.rows:
        print(f"{r.backend:<10} {r.transport:<30} {r.reps:>4} {r.median_ms:>10.2f} {r.min_ms:>9.2f} "
              f"{r.gbps:>8.2f} {r.vs_d2d:>7.3f} {r.verified}")
    for s in report.skipped:
        print(f"skipped: {s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    parser.add_argument("--tokens", type=int, help="request length (default: the shape's; e.g. 512 on CPU)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per backend")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per send call")
    parser.add_argument("--backends", default="zmq,nixl,cuda_ipc", help="comma-separated")
    parser.add_argument("--transports", default="tcp,ipc", help="zmq transports, comma-separated")
    parser.add_argument("--serve-prefill", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_prefill:
        serve_prefill(json.loads(args.serve_prefill))
        return 0
    torch.set_num_threads(int(os.environ.get("PDSERVE_TORCH_THREADS", "1")))
    shape = TINY if args.tiny else FULL
    if args.tokens:
        shape = replace(shape, tokens=args.tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    request_bytes = shape.layout("zmq").page_bytes * shape.pages
    report = Report(device, asdict(shape), request_bytes, d2d_copy_gbps(request_bytes, device))
    with tempfile.TemporaryDirectory(prefix="pdserve-kvbench-") as workdir:
        for backend in args.backends.split(","):
            if backend == "cuda_ipc" and device != "cuda":
                report.skipped.append("cuda_ipc: no CUDA device")
                continue
            if backend == "nixl" and not nixl_available():
                report.skipped.append("nixl: the nixl-cu12 package is not installed")
                continue
            for transport, address, split in runs(backend, args.transports.split(","), workdir, device):
                reps = args.reps + 1
                times, ok = run_backend(backend, address, shape, device, reps, args.chunk_tokens, split)
                timed = times[1:]  # the first repetition warms up (kernel compile, pinned buffers)
                med = statistics.median(timed)
                moved = request_bytes * len(shape.heads_of(split)) // shape.num_kv_heads
                gbps = moved / med / 1e9
                if split is not None:
                    transport += f" slices, rank {split.tp_rank}/TP {split.tp_size}"
                report.rows.append(Row(backend, transport, len(timed), med * 1e3, min(timed) * 1e3, gbps,
                                       gbps / report.d2d_copy_gbps, ok))
    print_table(report)
    if args.output:
        args.output.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if all(r.verified for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
