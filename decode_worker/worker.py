"""The decode worker: runs its scheduler's steps on the engine's ``Worker`` and lands KV pages
from prefill workers through a KV receiver.

Per step, before the forward: announce the rooms to expect (``KVExpect``: their destination
pages), abort rooms, and seed the future-token map of each slot that joins with the first token
the prefill side sampled (``NewReq.next_token``), so its first decode step reads it like any
token this worker sampled itself. Registration with a prefill worker's KV sender
(``RegisterKVPeer``) runs on a thread of its own, since it waits for the peer's answer; its
outcome, the room results (with the first token and its logprob) and the link states reach the
scheduler through ``kvtransfer.notifier.Notifier``. A data-plane link lost later registers again by
itself (``kvtransfer.links``); the scheduler need not ask again.

With ``--tp-size`` > 1 rank 0's receiver takes whole pages (every KV head) and lands its own
heads; the other ranks' heads reach them over the step relay before rank 0's next frame, and a
room's result waits until they have (``kvtransfer.tp_hub``). Over a pool-to-pool backend every
rank runs its own receiver instead, registered with the prefill ranks holding its heads
(``kvtransfer.tp_slices``), and reports its part of each room to rank 0, which reports the room
(``kvtransfer.tp_parts``). Every rank seeds the
first tokens.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import cast

import zmq

from engine.parallel.group import SINGLE_RANK, TensorParallel
from engine.parallel.ranks import FollowerHooks, FollowerRole, moves_kv_in_parts, run_follower
from engine.parallel.steps import FlushingRelay, Relay, StepRelay, make_relay
from engine.worker import Worker
from engine.worker_process import RESULT_LINGER_MS, StepHooks, worker_process
from kvtransfer import KVReceiver, TransferConfig, TransferError, layout_from_caches, make_backend
from kvtransfer.kernels import PagedCaches, PoolLander
from kvtransfer.notifier import Notifier
from kvtransfer.tp_hub import HeldResults, HubLander, InstanceHeads, instance_layout, land_shards
from kvtransfer.tp_parts import SUPERSEDED, PartReporter, RegistrationBarrier, RoomParts, parts_address
from kvtransfer.tp_slices import SlicedReceiver
from protocol.config import WorkerConfig
from protocol.dataplane import KVShardPages
from protocol.messages import (
    KVPeerRegistered,
    RegisterKVPeer,
    StepBatch,
    StepResult,
    TransferEndpoint,
    TransferResult,
)

logger = logging.getLogger("pdserve.decode_worker")


def seed_first_tokens(worker: Worker, batch: StepBatch) -> None:
    """Each joining slot's first decode reads the token the prefill side sampled."""
    next_tokens = worker.runner.next_tokens
    for new in batch.new_reqs:
        if new.next_token is not None:
            next_tokens[new.slot] = new.next_token


RegistrationReport = Callable[[int, KVPeerRegistered], None]  # (attempt, outcome) → the scheduler or rank 0


class DecodeWorker:
    """A decode rank's step hooks: rooms to expect and abort, first tokens seeded, and its
    receiver's registrations. A ``SlicedReceiver`` (where every rank receives its own KV heads:
    ``kvtransfer.tp_parts``, ``tp_slices``) registers with the prefill ranks holding its heads,
    of the ``RegisterKVPeer``'s ``rank_addresses``, and expects each room from them."""

    def __init__(
        self, worker: Worker, receiver: KVReceiver | SlicedReceiver, report: RegistrationReport,
        register_timeout: float,
    ) -> None:
        self.worker = worker
        self.receiver = receiver
        self.report = report
        self.register_timeout = register_timeout
        self.refused: list[TransferResult] = []  # rooms the receiver would not take
        self._attempts: dict[str, int] = {}  # RegisterKVPeer messages seen, by prefill instance
        if isinstance(receiver, SlicedReceiver):
            self._senders = lambda msg: receiver.sources(msg.transfer_addr, msg.rank_addresses)
        else:
            self._senders = lambda msg: [msg.transfer_addr]

    def step(self, batch: StepBatch) -> StepResult:
        for expect in batch.expects:
            try:
                self.receiver.expect(expect.room, expect.peer, expect.dst_pages)
            except (TransferError, ValueError) as e:
                self.refused.append(TransferResult(expect.room, ok=False, error=str(e)))
        for room in batch.abort_rooms:
            self.receiver.abort(room, "aborted by the decode scheduler")
        seed_first_tokens(self.worker, batch)
        return self.worker.step(batch)

    def take_refused(self) -> list[TransferResult]:
        out, self.refused = self.refused, []
        return out

    def register(self, msg: RegisterKVPeer) -> None:
        """Register on a thread of its own: it waits for the peers' answers."""
        attempt = self._attempts[msg.prefill_addr] = self._attempts.get(msg.prefill_addr, 0) + 1
        try:
            addresses = self._senders(msg)
        except ValueError as e:
            self.report(attempt, KVPeerRegistered(msg.prefill_addr, ok=False, error=str(e)))
            return
        args = (msg.prefill_addr, addresses, attempt)
        threading.Thread(target=self._register, args=args, name="kv-register", daemon=True).start()

    def _register(self, prefill_addr: str, addresses: list[str], attempt: int) -> None:
        for address in addresses:
            try:
                self.receiver.register(address, timeout=self.register_timeout)
            except TransferError as e:
                logger.warning("KV registration with %s failed: %s", address, e)
                self.report(attempt, KVPeerRegistered(prefill_addr, ok=False, error=str(e)))
                return
            logger.info("KV receiver registered with %s (%s)", address, prefill_addr)
        self.report(attempt, KVPeerRegistered(prefill_addr, ok=True))


def report_when_every_rank_registered(
    notifier: Notifier, barrier: RegistrationBarrier, timeout: float
) -> RegistrationReport:
    """Rank 0's registrations where every rank receives its own heads: reported once the other
    ranks' are in too (or one failed); an attempt a later one superseded is not reported."""

    def report(attempt: int, outcome: KVPeerRegistered) -> None:
        if not outcome.ok:
            barrier.settle(outcome.prefill_addr, attempt)
        elif (problem := barrier.wait(outcome.prefill_addr, attempt, timeout)) == SUPERSEDED:
            return
        elif problem is not None:
            outcome = KVPeerRegistered(outcome.prefill_addr, ok=False, error=problem)
        notifier.notify(outcome)

    return report


Receiving = tuple[KVReceiver, HubLander | None]  # a rank's receiver, and rank 0's lander of a hub


def start_decode(cfg: WorkerConfig, tp: TensorParallel = SINGLE_RANK) -> tuple[Worker, *Receiving]:
    """Rank 0's engine worker (its part of the model, with ``tp``) and KV receiver; with several
    ranks receiving through rank 0, the lander that keeps the others' heads."""
    worker = Worker.create(cfg.args, tp=tp)
    return (worker, *open_receiver(cfg, worker, tp))


def open_receiver(cfg: WorkerConfig, worker: Worker, tp: TensorParallel) -> Receiving:
    """The KV receiver over this rank's pool, advertising every rank's KV heads: on rank 0 only,
    landing the others' through a ``HubLander`` (``kvtransfer.tp_hub``), or on every rank with
    its own rank (``kvtransfer.tp_parts``)."""
    backend = cfg.args.transfer_backend
    pool = worker.runner.kv_pool
    pool_layout = layout_from_caches(pool.k, model=worker.loaded.name, backend=backend)
    layout, lander = pool_layout, None
    if tp.size > 1:
        heads = InstanceHeads.dealt(worker.config.num_kv_heads, tp.size)
        layout = instance_layout(pool_layout, heads, tp.rank)
        if not moves_kv_in_parts(cfg):
            lander = HubLander(PagedCaches(pool.k, pool.v), heads)
    receiver = make_backend(
        backend,
        "decode",
        layout,
        pool.k,
        pool.v,
        config=TransferConfig.from_args(cfg.args),
        pool_layout=pool_layout if tp.size > 1 else None,
        lander=lander,
    )
    return cast(KVReceiver, receiver), lander


def follower_hooks(cfg: WorkerConfig) -> FollowerHooks:
    """A rank other than 0 of a decode instance: seed the first tokens and step; land its heads
    of the pages rank 0 received (``kvtransfer.tp_hub``), or receive them itself, registering
    with its prefill ranks and reporting to rank 0 (``kvtransfer.tp_parts``)."""

    def hooks(worker: Worker, tp: TensorParallel, opened: contextlib.ExitStack) -> FollowerRole:
        if not moves_kv_in_parts(cfg):
            pool = worker.runner.kv_pool
            lander = PoolLander(PagedCaches(pool.k, pool.v))

            def step(batch: StepBatch) -> StepResult:
                seed_first_tokens(worker, batch)
                return worker.step(batch)

            return FollowerRole(step, {
                KVShardPages: lambda msg: land_shards(lander, msg, tp.rank), RegisterKVPeer: lambda _: None,
            })
        ctx = zmq.Context()
        opened.callback(ctx.term)
        receiver = opened.enter_context(contextlib.closing(open_receiver(cfg, worker, tp)[0]))
        sliced = SlicedReceiver(receiver)
        reporter = opened.enter_context(
            contextlib.closing(PartReporter(ctx, parts_address(cfg.dist_init_method), tp.rank, sliced))
        )
        dw = DecodeWorker(worker, sliced, reporter.registered, cfg.args.transfer_timeout)

        def step_in_parts(batch: StepBatch) -> StepResult:
            result = dw.step(batch)
            reporter.refused(dw.take_refused())
            return result

        return FollowerRole(step_in_parts, {RegisterKVPeer: dw.register})

    return hooks


def relay_of(tp: TensorParallel, lander: HubLander | None) -> Relay:
    if lander is None:
        return make_relay(tp)
    return FlushingRelay(StepRelay(tp), lander.flush)


def run_decode_worker(cfg: WorkerConfig) -> None:
    """The worker process of a decode instance: start up (or report ``WorkerFailed``), report
    ready, serve until shutdown."""
    if cfg.tp_rank > 0:
        run_follower(cfg, hooks=follower_hooks(cfg))
        return
    with worker_process(cfg) as proc:
        tp = proc.join_tensor_parallel(cfg)
        worker, receiver, lander = proc.start(lambda: start_decode(cfg, tp))
        receiver = proc.closing(receiver)
        timeout = cfg.args.transfer_timeout
        if moves_kv_in_parts(cfg):
            receiver = SlicedReceiver(receiver)  # its rooms from the prefill ranks holding its heads
        if moves_kv_in_parts(cfg) and tp.size > 1:
            address = parts_address(cfg.dist_init_method)
            parts = proc.closing(proc.start(lambda: RoomParts(proc.ctx, address, tp.size)))
            reporter = proc.closing(proc.start(lambda: PartReporter(proc.ctx, address, 0, receiver)))
            notifier = proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, parts, RESULT_LINGER_MS))
            report = report_when_every_rank_registered(notifier, parts.registrations, timeout)
            dw = DecodeWorker(worker, receiver, report, timeout)
            after_step = lambda: reporter.refused(dw.take_refused())  # noqa: E731
        else:
            results = receiver if lander is None else HeldResults(receiver, lander)
            notifier = proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, results, RESULT_LINGER_MS))
            dw = DecodeWorker(worker, receiver, lambda _, outcome: notifier.notify(outcome), timeout)
            after_step = dw.take_refused
        proc.announce_ready(worker.ready_message(TransferEndpoint(receiver.layout)))
        hooks = StepHooks(dw.step, after_step=after_step, handlers={RegisterKVPeer: dw.register})
        proc.serve(hooks, relay_of(tp, lander))
