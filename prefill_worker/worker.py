"""The prefill worker: runs its scheduler's steps on the engine's ``Worker`` and, after each
step's forward, sends the pages that step completed to the decode workers (``KVSend``).

The send only queues the pages: the KV sender's I/O thread moves them (on CUDA after the
forward that wrote them, on its own stream) while this thread runs the next step, so a
chunk's transfer overlaps the next chunk's compute. The last send of a room carries the token
this step sampled for it, with its logprob whenever the step computed logprobs (a row asked
for them). Room results (the decode side acknowledged every page, or the room
failed) and link states reach the scheduler from ``kvtransfer.notifier.Notifier``'s thread.
"""

from __future__ import annotations

import logging
from typing import cast

from engine.parallel.ranks import refuse_tensor_parallel
from engine.worker import RESULT_LINGER_MS, StepHooks, Worker, worker_process
from kvtransfer import DuplicateRoom, KVLayout, KVSender, TransferConfig, layout_from_caches, make_backend
from kvtransfer.notifier import Notifier
from prefill_worker.faults import with_faults
from protocol.config import WorkerConfig
from protocol.dataplane import TokenLogprob
from protocol.faults import Faults
from protocol.messages import StepBatch, StepResult, TransferEndpoint, TransferResult

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


def token_logprob(result: StepResult, row: int) -> TokenLogprob | None:
    """What ``result`` says of the logprobs of its ``row``'s token, if the request asked."""
    if not result.logprobs:
        return None
    top_ids, top_lps = result.top_token_ids, result.top_logprobs
    if top_ids and top_lps and top_ids[row]:
        return TokenLogprob(result.logprobs[row], top_ids[row], top_lps[row])
    return TokenLogprob(result.logprobs[row])


class PrefillWorker:
    def __init__(self, worker: Worker, sender: KVSender) -> None:
        self.worker = worker
        self.sender = sender
        self.refused: list[TransferResult] = []  # rooms the sender would not open (duplicates)

    def step(self, batch: StepBatch) -> StepResult:
        for room in batch.abort_rooms:
            self.sender.abort(room, "aborted by the prefill scheduler")
        result = self.worker.step(batch)
        if batch.transfers:
            sampled = dict(zip(result.slots, result.token_ids, strict=True))
            for send in batch.transfers:
                if send.first and not self._open(send.room):
                    continue
                first_token = sampled[send.slot] if send.last else None
                first_logprob = token_logprob(result, result.slots.index(send.slot)) if send.last else None
                self.sender.send(send.room, send.src_pages, send.dst_pages, first_token, first_logprob)
        return result

    def _open(self, room: int) -> bool:
        try:
            self.sender.add_room(room)
        except DuplicateRoom as e:
            self.refused.append(TransferResult(room, ok=False, error=str(e)))
            return False
        return True

    def take_refused(self) -> list[TransferResult]:
        out, self.refused = self.refused, []
        return out


def start_prefill(cfg: WorkerConfig) -> tuple[Worker, KVSender]:
    """The engine's worker and the KV sender over its pool."""
    refuse_tensor_parallel(cfg)
    worker = Worker.create(cfg.args, decodes=False)  # a prefill instance samples first tokens only
    backend = cfg.args.transfer_backend
    sender = make_backend(
        backend,
        "prefill",
        kv_layout(worker, backend),
        worker.runner.kv_pool.k,
        worker.runner.kv_pool.v,
        address=transfer_address(cfg),
        config=TransferConfig.from_args(cfg.args),
    )
    return worker, cast(KVSender, sender)


def run_prefill_worker(cfg: WorkerConfig) -> None:
    """The worker process of a prefill instance: start up (or report ``WorkerFailed``), report
    ready with the KV sender's address, serve until shutdown. The faults of ``PDSERVE_FAULTS``
    (``protocol.faults``) are read once, before anything starts."""
    with worker_process(cfg) as proc:
        faults = proc.start(Faults.from_env)
        worker, sender = proc.start(lambda: start_prefill(cfg))
        sender = proc.closing(sender)
        if (faulty := with_faults(sender, faults, cfg.name)) is not sender:
            sender = proc.closing(faulty)  # closed first: its queued sends still leave
        proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, sender, RESULT_LINGER_MS))
        proc.announce_ready(worker.ready_message(TransferEndpoint(sender.layout, sender.address)))
        pw = PrefillWorker(worker, sender)
        proc.serve(StepHooks(pw.step, after_step=pw.take_refused))
