"""Fault isolation: one ``InstanceSupervisor`` per instance (its scheduler and worker processes)
restarts the instance when one of its processes dies, without touching the other instances or
the front end (docs/design.md, "Launcher and supervision").

When a process of an instance dies, the other one gets ``exit_grace_s`` to end by itself (a
scheduler whose worker failed reports the failures first), is then sent SIGTERM, and killed
``stop_grace_s`` later. Once both are gone the instance starts again after a back-off that
doubles with each quick failure (``RestartPolicy``); an instance that stayed up for
``stable_s`` starts over from the first delay. After ``max_restarts`` quick failures in a row
the supervisor gives up, and the launcher stops the deployment as it did before restarts
existed. A restarted instance binds the same addresses, so its peers and front end take it back
by themselves (a new incarnation: its old requests were failed, its registrations are redone).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger("pdserve.launch")


class Process(Protocol):
    """What the supervisor needs of a child (``launch.Child``)."""

    name: str

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """How a dead instance is restarted (``--max-restarts``; 0: never, the deployment stops)."""

    max_restarts: int = 5  # quick failures in a row before giving up
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0  # up this long: the next failure is a first one again

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be ≥ 0, got {self.max_restarts}")


class Backoff:
    """Counts an instance's quick failures and says how long to wait before the next start."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.quick_failures = 0

    def after_death(self, up_for_s: float) -> float | None:
        """The delay before starting again after a death ``up_for_s`` after the last start;
        None when the instance failed quickly too often (give up)."""
        if up_for_s >= self.policy.stable_s:
            self.quick_failures = 0
        self.quick_failures += 1
        if self.quick_failures > self.policy.max_restarts:
            return None
        delay = self.policy.first_delay_s * 2 ** (self.quick_failures - 1)
        return min(self.policy.max_delay_s, delay)


class Phase(enum.Enum):
    RUNNING = "running"  # every process of the instance is up
    STOPPING = "stopping"  # one died: the others end (by themselves, SIGTERM, then SIGKILL)
    WAITING = "waiting"  # all gone: starts again at ``restart_at``
    GIVEN_UP = "given_up"  # failed quickly too often: the deployment stops


@dataclass
class Timing:
    exit_grace_s: float = 2.0  # for the other process to report failures and exit by itself
    stop_grace_s: float = 10.0  # after SIGTERM, before SIGKILL


class InstanceSupervisor:
    """One instance's processes and their restarts. ``start`` starts every process of the
    instance and returns them (``restart`` is False only for the first start)."""

    def __init__(
        self,
        name: str,
        start: Callable[[bool], list[Process]],
        policy: RestartPolicy,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_restart: Callable[[InstanceSupervisor], None] | None = None,
    ) -> None:
        self.name = name
        self._start = start
        self._backoff = Backoff(policy)
        self._timing = timing or Timing()
        self._clock = clock
        self._on_restart = on_restart
        self.restarts = 0
        self.phase = Phase.RUNNING
        self.children: list[Process] = start(False)
        self.started_at = clock()
        self.dead: Process | None = None  # the process whose death stopped the instance last
        self._died_at = 0.0
        self._deadline = 0.0  # STOPPING: SIGTERM, then SIGKILL, at this time; WAITING: start
        self._terminated = False  # STOPPING: SIGTERM sent

    def first_dead(self) -> Process | None:
        return next((c for c in self.children if c.poll() is not None), None)

    def step(self) -> Process | None:
        """Advance the instance's state; returns the dead process once the supervisor gave up."""
        now = self._clock()
        if self.phase is Phase.RUNNING:
            self._check_running(now)
        if self.phase is Phase.STOPPING:
            self._check_stopping(now)
        if self.phase is Phase.WAITING and now >= self._deadline:
            self._restart(now)
        return self.dead if self.phase is Phase.GIVEN_UP else None

    def next_deadline(self) -> float | None:
        """When ``step`` next has timed work to do (None: only a death wakes it)."""
        return self._deadline if self.phase in (Phase.STOPPING, Phase.WAITING) else None

    def _check_running(self, now: float) -> None:
        dead = self.first_dead()
        if dead is None:
            return
        self.dead, self._died_at = dead, now
        logger.warning("instance %s: %s exited with code %s; stopping the instance", self.name,
                       dead.name, dead.poll())
        self.phase = Phase.STOPPING
        self._deadline = now + self._timing.exit_grace_s
        self._terminated = False

    def _check_stopping(self, now: float) -> None:
        alive = [c for c in self.children if c.poll() is None]
        if not alive:
            self._stopped(now)
            return
        if now < self._deadline:
            return
        if not self._terminated:
            for child in alive:
                child.terminate()
            self._terminated = True
            self._deadline = now + self._timing.stop_grace_s
            return
        for child in alive:
            logger.warning("instance %s: %s did not stop; killing it", self.name, child.name)
            child.kill()
        self._deadline = now + self._timing.stop_grace_s

    def _stopped(self, now: float) -> None:
        delay = self._backoff.after_death(self._died_at - self.started_at)
        if delay is None:
            logger.error("instance %s failed %d times in a row within %g s of its start; giving up",
                         self.name, self._backoff.quick_failures, self._backoff.policy.stable_s)
            self.phase = Phase.GIVEN_UP
            return
        logger.warning("instance %s stopped; restarting it in %g s", self.name, delay)
        self.phase, self._deadline = Phase.WAITING, now + delay

    def _restart(self, now: float) -> None:
        self.children = self._start(True)
        self.started_at, self.phase = now, Phase.RUNNING
        self.restarts += 1
        logger.info("instance %s restarted (restart %d)", self.name, self.restarts)
        if self._on_restart is not None:
            self._on_restart(self)
