"""The prefill worker: runs its scheduler's steps on the engine's ``Worker`` and, after each
step's forward, sends the pages that step completed to the decode workers (``KVSend``).

The send only queues the pages: the KV sender's I/O thread moves them (on CUDA after the
forward that wrote them, on its own stream) while this thread runs the next step, so a
chunk's transfer overlaps the next chunk's compute. The last send of a room carries the token
this step sampled for it, with its logprob whenever the step computed logprobs (a row asked
for them). Room results (the decode side acknowledged every page, or the room
failed) and link states reach the scheduler from ``kvtransfer.notifier.Notifier``'s thread.

With ``--tp-size`` > 1 every rank runs each step, then the ranks gather the pages it sends into
rank 0's host staging buffers of every KV head (``StagedSends``), which rank 0's sender sends
as they are (``kvtransfer.tp_hub``); the other ranks are ``run_follower``'s, with that gather
after each step. Over a pool-to-pool backend every rank sends its own heads through its own
sender instead, to the decode ranks holding them (``kvtransfer.tp_slices``), and reports its
part of each room to rank 0 (``kvtransfer.tp_parts``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import cast

import torch
import zmq

from engine.parallel.group import SINGLE_RANK, TensorParallel
from engine.parallel.ranks import FollowerHooks, FollowerRole, moves_kv_in_parts, run_follower
from engine.parallel.steps import gather_strings, gather_to_driver, make_relay
from engine.worker import Worker
from engine.worker_process import RESULT_LINGER_MS, StepHooks, worker_process
from kvtransfer import KVLayout, KVSender, TransferConfig, TransferError, layout_from_caches, make_backend
from kvtransfer.kernels import PagedCaches, page_ops_for
from kvtransfer.notifier import Notifier
from kvtransfer.tp_hub import InstanceHeads, instance_layout
from kvtransfer.tp_parts import PartReporter, RoomParts, parts_address, rank_transfer_address
from kvtransfer.tp_slices import SlicedSender
from prefill_worker.faults import with_faults
from protocol.config import WorkerConfig
from protocol.dataplane import TokenLogprob
from protocol.faults import Faults
from protocol.messages import KVSend, StepBatch, StepResult, TransferEndpoint, TransferResult

logger = logging.getLogger("pdserve.prefill_worker")


def transfer_address(cfg: WorkerConfig) -> str:
    """Where the KV sender binds: reachable wherever the instance's input address is (a free port
    on the same host for tcp, a sibling path for ipc); in-process names for the fake backend."""
    if cfg.args.transfer_backend == "fake":
        return f"fake://{cfg.name}"
    addr = cfg.addrs.input_addr
    if addr.startswith("tcp://"):
        host = addr.removeprefix("tcp://").rsplit(":", 1)[0]
        return f"tcp://{host}:*"
    return f"{addr}-kv"


def kv_layout(worker: Worker, backend: str) -> KVLayout:
    return layout_from_caches(worker.runner.kv_pool.k, model=worker.loaded.name, backend=backend)


def instance_heads(worker: Worker, tp: TensorParallel) -> InstanceHeads:
    """Which KV heads each rank of this worker's instance holds."""
    return InstanceHeads.dealt(worker.config.num_kv_heads, tp.size)


class StagedSends:
    """The pages a step of a tensor-parallel instance sends, gathered from every rank right after
    the step (one collective per step that sends pages): on rank 0, one host staging buffer of
    every KV head per send; nothing on the other ranks."""

    def __init__(self, worker: Worker, tp: TensorParallel) -> None:
        pool = worker.runner.kv_pool
        self._pool = PagedCaches(pool.k, pool.v)
        self._ops = page_ops_for(self._pool.device)
        self._tp = tp
        self._heads = instance_heads(worker, tp)

    def gather(self, batch: StepBatch) -> list[torch.Tensor] | None:
        """Per send of ``batch`` (in order) its staging buffer, on rank 0; None elsewhere, or
        when no send carries pages. Every rank calls it after every step."""
        pages = [p for send in batch.transfers for p in send.src_pages]
        if not pages:
            return None
        local = self._ops.gather(self._pool, pages).cpu()
        parts = gather_to_driver(self._tp, local, self._heads.shapes_of(local.shape))
        if parts is None:
            return None
        whole, out, start = self._heads.assemble(parts), [], 0
        for send in batch.transfers:
            out.append(whole.narrow(1, start, len(send.src_pages)).contiguous())
            start += len(send.src_pages)
        return out


def token_logprob(result: StepResult, row: int) -> TokenLogprob | None:
    """What ``result`` says of the logprobs of its ``row``'s token, if the request asked."""
    if not result.logprobs:
        return None
    top_ids, top_lps = result.top_token_ids, result.top_logprobs
    if top_ids and top_lps and top_ids[row]:
        return TokenLogprob(result.logprobs[row], top_ids[row], top_lps[row])
    return TokenLogprob(result.logprobs[row])


class PrefillWorker:
    """A prefill rank's step hook: the step, then its sends. A ``SlicedSender`` opens each room
    towards the decode instance's ranks (``KVSend.decode_tp_size``)."""

    def __init__(
        self, worker: Worker, sender: KVSender | SlicedSender, staged: StagedSends | None = None
    ) -> None:
        self.worker = worker
        self.sender = sender
        self.staged = staged  # a tensor-parallel instance's: the ranks gather the sent pages
        self.refused: list[TransferResult] = []  # rooms the sender would not open (duplicates)
        if isinstance(sender, SlicedSender):
            self._add_room = lambda send: sender.add_room(send.room, send.decode_tp_size)
        else:
            self._add_room = lambda send: sender.add_room(send.room)

    def step(self, batch: StepBatch) -> StepResult:
        for room in batch.abort_rooms:
            self.sender.abort(room, "aborted by the prefill scheduler")
        result = self.worker.step(batch)
        if batch.transfers:
            staged = self.staged.gather(batch) if self.staged is not None else None
            sampled = dict(zip(result.slots, result.token_ids, strict=True))
            for i, send in enumerate(batch.transfers):
                if send.first and not self._open(send):
                    continue
                first_token = sampled[send.slot] if send.last else None
                first_logprob = token_logprob(result, result.slots.index(send.slot)) if send.last else None
                pages = None if staged is None else staged[i]
                self.sender.send(
                    send.room, send.src_pages, send.dst_pages, first_token, first_logprob, staged=pages
                )
        return result

    def _open(self, send: KVSend) -> bool:
        try:
            self._add_room(send)
        except (TransferError, ValueError) as e:  # a duplicate room, or one too large for parts
            self.refused.append(TransferResult(send.room, ok=False, error=str(e)))
            return False
        return True

    def take_refused(self) -> list[TransferResult]:
        out, self.refused = self.refused, []
        return out


@dataclass
class PrefillSide:
    """A prefill rank's engine worker and KV sender; on rank 0 of an instance whose ranks send
    in parts, every rank's sender address (by rank; its own alone for one rank)."""

    worker: Worker
    sender: KVSender
    rank_addresses: list[str]


def start_prefill(cfg: WorkerConfig, tp: TensorParallel = SINGLE_RANK) -> PrefillSide:
    """Rank 0's engine worker (its part of the model, with ``tp``) and KV sender."""
    worker = Worker.create(cfg.args, decodes=False, tp=tp)  # a prefill instance samples first tokens only
    return open_sender(cfg, worker, tp)


def open_sender(cfg: WorkerConfig, worker: Worker, tp: TensorParallel) -> PrefillSide:
    """The KV sender over this rank's pool: advertising every rank's KV heads, on rank 0 only
    (``kvtransfer.tp_hub``) or on every rank with its own rank (``kvtransfer.tp_parts``: the
    ranks gather their addresses, a collective)."""
    backend = cfg.args.transfer_backend
    pool_layout = kv_layout(worker, backend)
    layout = pool_layout
    if tp.size > 1:
        layout = instance_layout(pool_layout, instance_heads(worker, tp), tp.rank)
    sender = cast(KVSender, make_backend(
        backend,
        "prefill",
        layout,
        worker.runner.kv_pool.k,
        worker.runner.kv_pool.v,
        address=rank_transfer_address(transfer_address(cfg), tp.rank),
        config=TransferConfig.from_args(cfg.args),
        pool_layout=pool_layout if tp.size > 1 else None,
    ))
    rank_addresses: list[str] = []
    if moves_kv_in_parts(cfg):
        rank_addresses = [sender.address] if tp.size == 1 else gather_strings(tp, sender.address) or []
    return PrefillSide(worker, sender, rank_addresses)


def follower_hooks(cfg: WorkerConfig) -> FollowerHooks:
    """A rank other than 0 of a prefill instance: each step, then its part of the pages sent:
    gathered for rank 0 (``kvtransfer.tp_hub``), or sent by its own sender, whose results go to
    rank 0 (``kvtransfer.tp_parts``)."""

    def hooks(worker: Worker, tp: TensorParallel, opened: contextlib.ExitStack) -> FollowerRole:
        if not moves_kv_in_parts(cfg):
            staged = StagedSends(worker, tp)

            def step(batch: StepBatch) -> None:
                worker.step(batch)
                if batch.transfers:
                    staged.gather(batch)

            return FollowerRole(step)
        ctx = zmq.Context()
        opened.callback(ctx.term)
        side = open_sender(cfg, worker, tp)
        sender = opened.enter_context(contextlib.closing(side.sender))
        if (faulty := with_faults(sender, Faults.from_env(), cfg.process_name)) is not sender:
            sender = opened.enter_context(contextlib.closing(faulty))
        sliced = SlicedSender(sender)
        reporter = opened.enter_context(
            contextlib.closing(PartReporter(ctx, parts_address(cfg.dist_init_method), tp.rank, sliced))
        )
        pw = PrefillWorker(worker, sliced)

        def step_in_parts(batch: StepBatch) -> None:
            pw.step(batch)
            reporter.refused(pw.take_refused())

        return FollowerRole(step_in_parts)

    return hooks


def run_prefill_worker(cfg: WorkerConfig) -> None:
    """The worker process of a prefill instance: start up (or report ``WorkerFailed``), report
    ready with the KV sender's address, serve until shutdown. The faults of ``PDSERVE_FAULTS``
    (``protocol.faults``) are read once, before anything starts."""
    if cfg.tp_rank > 0:
        run_follower(cfg, decodes=False, hooks=follower_hooks(cfg))
        return
    with worker_process(cfg) as proc:
        faults = proc.start(Faults.from_env)
        tp = proc.join_tensor_parallel(cfg)
        side = proc.start(lambda: start_prefill(cfg, tp))
        worker, sender = side.worker, proc.closing(side.sender)
        if (faulty := with_faults(sender, faults, cfg.name)) is not sender:
            sender = proc.closing(faulty)  # closed first: its queued sends still leave
        if moves_kv_in_parts(cfg):
            sender = SlicedSender(sender)  # its rooms towards the decode ranks holding its heads
        results, reporter = sender, None  # what the notifier polls; rank 0's part reporter
        if moves_kv_in_parts(cfg) and tp.size > 1:
            address = parts_address(cfg.dist_init_method)
            results = proc.closing(proc.start(lambda: RoomParts(proc.ctx, address, tp.size)))
            reporter = proc.closing(proc.start(lambda: PartReporter(proc.ctx, address, 0, sender)))
        proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, results, RESULT_LINGER_MS))
        endpoint = TransferEndpoint(sender.layout, sender.address, side.rank_addresses)
        proc.announce_ready(worker.ready_message(endpoint))
        staged = StagedSends(worker, tp) if tp.size > 1 and reporter is None else None
        pw = PrefillWorker(worker, sender, staged)
        after_step = pw.take_refused if reporter is None else (lambda: reporter.refused(pw.take_refused()))
        proc.serve(StepHooks(pw.step, after_step=after_step), make_relay(tp))
