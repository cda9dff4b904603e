"""Start a pdserve deployment: ``python launch.py --mode unified [flags]``; make the CURVE keys of
a cluster deployment: ``python launch.py keys --out DIR --names frontend prefill0 decode0``.

The launcher only supervises: it starts every role as its own Python process (``python -m
<package> --config <json>``), waits until the front end reports ready, prints the address,
and from then on waits for a signal or a child's death. Ctrl-C / SIGTERM drain first: the front
end (told by SIGUSR2) refuses new requests and gives live ones ``--drain-timeout`` seconds; then
every child stops; a second signal stops them at once. Once the deployment was ready, a dead
process of an instance stops and restarts that instance alone (launcher/supervisor.py, with
back-off, up to ``--max-restarts`` quick failures in a row); a dead front end or HTTP server, an
instance given up on, or any death before readiness makes the launcher stop the rest (instances
first, the front end last, so that failures the instances reported reach the clients) and exit
non-zero with that child's error. The ipc directory is removed on exit.
Children run in their own session (so a terminal's Ctrl-C reaches only the launcher) and die
with it if it is killed outright (PR_SET_PDEATHSIG, see protocol/process.py). The command line is
launcher/flags.py, a child process and its readiness probe launcher/children.py, an instance's
restarts launcher/supervisor.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine import cpu_env
from launcher.children import (  # noqa: F401 (Child: part of launch's API)
    REPO_ROOT,
    Child,
    instance_probe,
    spawn,
)
from launcher.flags import flag_choices, parse_args  # noqa: F401 (flag_choices: part of launch's API)
from launcher.frontends import bind_http, start_frontends
from launcher.supervisor import InstanceSupervisor, RestartPolicy
from protocol.config import (
    InstanceAddrs,
    Mode,
    SchedulerConfig,
    ServerArgs,
    WorkerConfig,
)
from protocol.faults import FAULTS_ENV
from protocol.messages import Role
from protocol.process import SignalWakeup, dump_stacks_on_sigusr1
from protocol.security import ClusterKeys
from protocol.security import main as keys_main
from protocol.transport import ipc_addr, ipc_dir

STOP_GRACE_S = 10.0
FAILURE_GRACE_S = 2.0  # after a child's death, for the others to report failures and exit by themselves
DRAIN_MARGIN_S = 5.0  # beyond --drain-timeout, for the front end to answer the rest and exit

logger = logging.getLogger("pdserve.launch")


# --------------------------------------------------------------------------------------------
# Children of each mode (launcher/children.py: how one is started, how it is probed)
# --------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """What a mode started: its instances (each restarted on its own), its other children (the
    front end, the HTTP server: their death stops everything), and how to tell when it is ready."""

    mode: str
    address: str  # what the deployment serves on: the HTTP API's URL, or an instance's address
    children: list[Child]  # those not part of an instance
    probe: Callable[[], bool]  # one readiness check; True once ready
    directory: str | None = None  # the private ipc directory, removed on exit
    frontends: list[Child] = field(default_factory=list)  # drained before the rest stop
    drain_timeout: float = 0.0
    instances: list[InstanceSupervisor] = field(default_factory=list)

    def all_children(self) -> list[Child]:
        """Every process of the deployment now: the instances' current ones first."""
        current = [c for inst in self.instances for c in inst.children]
        return [*current, *self.children]  # type: ignore[list-item]


WORKER_PACKAGES = {Role.UNIFIED: "engine", Role.PREFILL: "prefill_worker", Role.DECODE: "decode_worker"}


def start_instance(
    args: ServerArgs, name: str, role: Role, input_addr: str, directory: str, restart: bool = False
) -> list[Child]:
    """One instance: its worker (a process per tensor-parallel rank) and its scheduler; on a
    node other than 0 of a multi-node instance (``--node-rank`` > 0), that node's ranks only. A
    restarted instance runs without the injected faults of ``PDSERVE_FAULTS`` (they apply to
    the first incarnation only)."""
    addrs = InstanceAddrs(
        input_addr=input_addr,
        step_addr=ipc_addr(directory, f"{name}-step"),
        result_addr=ipc_addr(directory, f"{name}-result"),
    )
    worker = WorkerConfig(args=args, name=name, role=role, addrs=addrs)
    scheduler = SchedulerConfig(args=args, name=name, role=role, addrs=addrs)
    env = {FAULTS_ENV: ""} if restart else {}
    ranks = worker.tensor_parallel_ranks(directory)  # one worker process per --tp-size rank of this node
    worker_env = {**cpu_env.worker_environment(), **env}
    workers = [spawn(rank.process_name, WORKER_PACKAGES[role], rank, worker_env) for rank in ranks]
    if args.node_rank > 0:
        return workers
    return [*workers, spawn(f"{name}-scheduler", "scheduler_proc", scheduler, env)]


def supervised_instance(
    args: ServerArgs, name: str, role: Role, input_addr: str, directory: str, policy: RestartPolicy
) -> InstanceSupervisor:
    """An instance started now, and restarted alone when one of its processes dies."""

    def start_it(restart: bool) -> list[Child]:
        return start_instance(args, name, role, input_addr, directory, restart)

    return InstanceSupervisor(name, start_it, policy, on_restart=announce_restart)  # type: ignore[arg-type]


def announce_restart(instance: InstanceSupervisor) -> None:
    """Its new processes, as the ``pdserve: started`` line names them."""
    pids = " ".join(f"{c.name}={c.proc.pid}" for c in instance.children)  # type: ignore[attr-defined]
    print(f"pdserve: restarted {instance.name}: {pids}", flush=True)


def start(mode: Mode, args: ServerArgs, ns: argparse.Namespace) -> Deployment:
    """Start the mode's processes; ValueError (nothing started) when the HTTP port is taken."""
    fronted = mode in (Mode.UNIFIED, Mode.PD, Mode.FRONTEND) and args.node_rank == 0
    listeners = bind_http(args) if fronted else []  # first: a port in use stops everything here
    directory = ipc_dir()
    policy = RestartPolicy(max_restarts=ns.max_restarts)
    if mode in (Mode.PREFILL, Mode.DECODE):
        addr = f"tcp://{args.host}:{args.port}"
        # Named by address: instances of one deployment start from separate launches.
        name = f"{mode}@{args.host}:{args.port}"
        instance = supervised_instance(args, name, Role(mode), addr, directory, policy)
        probe = instance_probe(addr, directory, ClusterKeys.from_dir(args.cluster_key_dir))
        return Deployment(mode, addr, [], probe, directory, instances=[instance])
    if mode == Mode.UNIFIED and args.node_rank > 0:
        return start_follower_node(args, directory, policy)
    unified: list[str] = []
    prefill: list[str] = list(ns.prefill)
    decode: list[str] = list(ns.decode)
    instances: list[InstanceSupervisor] = []
    if mode == Mode.UNIFIED:
        unified = [ipc_addr(directory, "unified0-input")]
        instances.append(supervised_instance(args, "unified0", Role.UNIFIED, unified[0], directory, policy))
    elif mode == Mode.PD:
        prefill = [ipc_addr(directory, f"prefill{i}-input") for i in range(ns.num_prefill)]
        decode = [ipc_addr(directory, f"decode{i}-input") for i in range(ns.num_decode)]
        for i, addr in enumerate(prefill):
            instances.append(supervised_instance(args, f"prefill{i}", Role.PREFILL, addr, directory, policy))
        for i, addr in enumerate(decode):
            instances.append(supervised_instance(args, f"decode{i}", Role.DECODE, addr, directory, policy))
    addrs = {"unified": unified, "prefill": prefill, "decode": decode}
    front = start_frontends(mode, args, ns, directory, listeners, addrs)
    return Deployment(mode, front.address, front.children, front.probe(), directory, front.frontends,
                      args.drain_timeout, instances)


def start_follower_node(args: ServerArgs, directory: str, policy: RestartPolicy) -> Deployment:
    """Node R > 0 of a multi-node instance (``--nnodes``): its tensor-parallel ranks only (node 0
    runs the front end, the scheduler and rank 0). They join rank 0 at ``--dist-init-addr``,
    waiting for it as long as it is away; when rank 0 is gone they exit and are started again
    (``--max-restarts`` bounds quick failures in a row), so the node stays up until SIGTERM."""
    instance = supervised_instance(args, "unified0", Role.UNIFIED, "", directory, policy)
    ranks = args.node_tp_ranks()
    address = (f"node {args.node_rank} of {args.nnodes}: tensor-parallel ranks {ranks.start}.."
               f"{ranks.stop - 1} of unified0, rank 0 at {args.dist_init_addr}")
    return Deployment(Mode.UNIFIED, address, [], lambda: True, directory, instances=[instance])


# --------------------------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------------------------


SIGNAL_CHECK_S = 0.5  # longest wait between checks of the children


class Supervisor:
    """Waits for readiness, then for a signal or a death it cannot mend (a dead instance is
    restarted by its ``InstanceSupervisor``), and stops everyone."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.stop_signal: int | None = None
        self.wakeup = SignalWakeup()

    def install_signal_handlers(self) -> None:
        self.wakeup.install()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that it wakes the wait

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def dead_child(self) -> Child | None:
        return next((c for c in self.deployment.all_children() if c.proc.poll() is not None), None)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the deployment says ready; False on a signal or a dead child."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stop_signal is not None or self.dead_child() is not None:
                return False
            if self.deployment.probe():
                return True
            self.wakeup.wait(0.2)
        raise TimeoutError(f"the deployment was not ready within {timeout_s:.0f} s")

    def wait_until_stopped(self) -> Child | None:
        """Block until a stop signal (returns None), or the death of a child that is not part
        of an instance, or of an instance's child once its restarts were given up (returned).
        Meanwhile dead instances are stopped and restarted."""
        while True:
            if self.stop_signal is not None:
                return None
            dead = next((c for c in self.deployment.children if c.proc.poll() is not None), None)
            if dead is not None:
                return dead
            for instance in self.deployment.instances:
                given_up = instance.step()
                if given_up is not None:
                    return given_up  # type: ignore[return-value]
            self.wakeup.wait(self._next_wait())

    def _next_wait(self) -> float:
        """Until the next check: a child's death (SIGCHLD) ends it early; an instance being
        stopped or waiting to start again needs a check at its deadline."""
        deadlines = [d for inst in self.deployment.instances if (d := inst.next_deadline()) is not None]
        soonest = min(deadlines, default=time.monotonic() + SIGNAL_CHECK_S) - time.monotonic()
        return min(SIGNAL_CHECK_S, max(0.0, soonest))

    def drain(self) -> Child | None:
        """Tell the front ends to drain (SIGUSR2) and wait until they exit, a second stop signal
        or another child's death (returned); a deployment without a front end has nothing to drain."""
        frontends = [c for c in self.deployment.frontends if c.proc.poll() is None]
        if not frontends:
            return None
        first_signal, self.stop_signal = self.stop_signal, None
        logger.info("draining: in-flight requests get %g s", self.deployment.drain_timeout)
        for frontend in frontends:
            frontend.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + self.deployment.drain_timeout + DRAIN_MARGIN_S
        others = [c for c in self.deployment.all_children() if c not in self.deployment.frontends]
        dead = None
        while (time.monotonic() < deadline and self.stop_signal is None
               and any(c.proc.poll() is None for c in frontends)):
            dead = next((c for c in others if c.proc.poll() is not None), None)
            if dead is not None:
                break
            self.wakeup.wait(SIGNAL_CHECK_S)
        if self.stop_signal is not None:
            logger.warning("second signal: stopping at once")
        self.stop_signal = self.stop_signal or first_signal
        return dead

    def stop_all(self, failure_grace_s: float = 0.0) -> None:
        """Stop every child: the instances (given ``failure_grace_s`` to exit by themselves),
        then the front ends and the HTTP servers, so that the front ends read what they reported."""
        last = self.deployment.children
        first = [c for c in self.deployment.all_children() if c not in last]
        deadline = time.monotonic() + failure_grace_s
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in first):
            self.wakeup.wait(0.05)
        for group in (first, last):
            _stop(group)


def _stop(children: list[Child]) -> None:
    """SIGTERM ``children``, and kill those still running ``STOP_GRACE_S`` later."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE_S)
            child.proc.kill()
            child.proc.wait()


def report_failure(child: Child) -> None:
    if child.forwarder is not None:
        child.forwarder.join(timeout=5.0)  # the child has exited: its stderr is about to end
    print(
        f"launch: {child.name} exited with code {child.proc.returncode}; its last output:",
        file=sys.stderr,
    )
    sys.stderr.write("".join(child.tail))
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    try:
        mode, args, ns = parse_args(argv)
        deployment = start(mode, args, ns)
    except ValueError as e:  # a flag, or a port taken: nothing was started
        print(f"launch: {e}", file=sys.stderr)
        return 2
    try:
        return supervise(deployment, mode, ns)
    finally:
        if deployment.directory is not None:
            shutil.rmtree(deployment.directory, ignore_errors=True)


def supervise(deployment: Deployment, mode: Mode, ns: argparse.Namespace) -> int:
    """Wait for readiness, then for a stop signal (drain, then stop) or a child's death."""
    supervisor = Supervisor(deployment)
    supervisor.install_signal_handlers()
    dump_stacks_on_sigusr1()
    pids = " ".join(f"{c.name}={c.proc.pid}" for c in deployment.all_children())
    print(f"pdserve: started {mode}: {pids}", flush=True)
    try:
        if supervisor.wait_ready(timeout_s=float(os.environ.get("PDSERVE_READY_TIMEOUT", "900"))):
            print(f"pdserve ready: {mode} on {deployment.address}", flush=True)
            dead = supervisor.wait_until_stopped()
            if dead is None:
                dead = supervisor.drain()
        else:
            dead = supervisor.dead_child()
    except TimeoutError as e:
        print(f"launch: {e}", file=sys.stderr)
        supervisor.stop_all()
        return 1
    supervisor.stop_all(FAILURE_GRACE_S if dead is not None else 0.0)
    if dead is not None:
        report_failure(dead)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
