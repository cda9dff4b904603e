"""``python -m scheduler_proc --config '<SchedulerConfig JSON>'``: the scheduler of an instance."""

import logging
import sys

from protocol.config import SchedulerConfig
from protocol.process import start_process
from scheduler_proc.scheduler import WorkerLost, run_scheduler


def main() -> None:
    cfg = start_process("python -m scheduler_proc", SchedulerConfig, __doc__)
    try:
        run_scheduler(cfg)
    except WorkerLost as e:
        logging.getLogger("scheduler_proc").error("%s: %s", cfg.name, e)
        sys.exit(1)


if __name__ == "__main__":
    main()
