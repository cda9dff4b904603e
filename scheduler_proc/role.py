"""What an instance's role adds to the scheduler core: the extension points ``SchedulerCore``
calls, and the unified role, which adds nothing.

The core owns requests, queues, pages and step formation; a role object plugs in (composition,
no subclassing of the core): it may screen and hold arriving requests, fill each step its own
way, react to a chunk, a step's result, a request's end, peer and worker messages and the clock,
and widen the core's counts. The prefill and decode roles are in ``prefill_mode.py`` and
``decode_mode.py``; docs/design.md ("Scheduler roles") has the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from protocol.messages import Message, Role, TokenizedRequest

if TYPE_CHECKING:
    from scheduler_proc.batch import SentStep, StepBuilder
    from scheduler_proc.core import SchedulerCore
    from scheduler_proc.request import Request


@dataclass(frozen=True)
class Refusal:
    """Why an arriving request is not taken: the code and message of its ``RequestFailed``."""

    code: str
    message: str


class InstanceRole(Protocol):
    name: Role  # as status, heartbeats and failures report it
    streams_outputs: bool  # False: the front end hears only failures from this instance

    def screen(self, msg: TokenizedRequest) -> Refusal | None:
        """The role's own refusal of an arriving request (checked before the common checks)."""

    def refused(self, msg: TokenizedRequest, refusal: Refusal) -> None:
        """``msg`` was refused (by either check): tell whoever else waits for it."""

    def hold(self, req: Request, msg: TokenizedRequest) -> bool:
        """A new request: True if the role holds it until it is schedulable, False to queue it
        in ``waiting`` at once."""

    def fill_step(self, step: StepBuilder) -> None:
        """Put this step's work into ``step``."""

    def on_chunk(self, req: Request, step: StepBuilder, last: bool) -> None:
        """A prefill chunk of ``req`` was scheduled in ``step``; ``last``: its prefill is done."""

    def on_step_done(self, sent: SentStep) -> None:
        """The result of ``sent`` was processed."""

    def detach(self, req: Request) -> bool:
        """Take an ending ``req`` out of what the role holds it in; False if the core holds it."""

    def on_end(self, req: Request, cache: bool) -> bool:
        """``req`` ended; True if the role keeps its pages (the data plane still uses them)."""

    def on_peer_message(self, msg: Message) -> bool:
        """A message from a peer instance (or a front end's ``ConnectPrefill``); False if not taken."""

    def on_worker_message(self, msg: Message) -> bool:
        """A worker message other than a step result; False if not taken."""

    def tick(self, now: float) -> None:
        """Periodic work (heartbeats, timeouts); ``now`` is the core's clock."""

    def peer_states(self) -> dict[str, str]:
        """Registration state per peer instance, for the heartbeat to the front end."""

    def link_states(self) -> dict[str, str]:
        """The worker's data-plane links by peer, as it last reported them, for ``status``."""

    def owed_slots(self) -> int:
        """Requests that will take a worker slot without being admitted again."""

    def queued(self) -> int:
        """Requests the role holds that are not started yet."""

    def queued_tokens(self) -> int:
        """Tokens of the queued requests counted as load."""


class UnifiedRole:
    """Prefill and decode on one instance: a done prefill joins the running batch."""

    name = Role.UNIFIED
    streams_outputs = True

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    def screen(self, msg: TokenizedRequest) -> Refusal | None:
        return None

    def refused(self, msg: TokenizedRequest, refusal: Refusal) -> None:
        pass

    def hold(self, req: Request, msg: TokenizedRequest) -> bool:
        return False

    def fill_step(self, step: StepBuilder) -> None:
        self.core.schedule_decodes(step)
        self.core.schedule_prefills(step)

    def on_chunk(self, req: Request, step: StepBuilder, last: bool) -> None:
        if last:
            self.core.start_running(req)

    def on_step_done(self, sent: SentStep) -> None:
        pass

    def detach(self, req: Request) -> bool:
        return False

    def on_end(self, req: Request, cache: bool) -> bool:
        return False

    def on_peer_message(self, msg: Message) -> bool:
        return False

    def on_worker_message(self, msg: Message) -> bool:
        return False

    def tick(self, now: float) -> None:
        pass

    def peer_states(self) -> dict[str, str]:
        return {}

    def link_states(self) -> dict[str, str]:
        return {}

    def owed_slots(self) -> int:
        return 0

    def queued(self) -> int:
        return 0

    def queued_tokens(self) -> int:
        return 0
