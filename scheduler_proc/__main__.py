"""``python -m scheduler_proc --config '<SchedulerConfig JSON>'``: the scheduler of an instance."""

from __future__ import annotations

import argparse
import logging
import sys

from protocol.config import SchedulerConfig, config_from_json
from protocol.process import die_with_parent, exit_on_sigterm
from scheduler_proc.scheduler import WorkerLost, run_scheduler

logger = logging.getLogger("scheduler_proc")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scheduler_proc", description=__doc__)
    parser.add_argument("--config", required=True, help="SchedulerConfig as JSON")
    cfg = config_from_json(SchedulerConfig, parser.parse_args().config)
    logging.basicConfig(
        level=cfg.args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {cfg.name} %(name)s: %(message)s",
    )
    die_with_parent()
    exit_on_sigterm()
    try:
        run_scheduler(cfg)
    except WorkerLost as e:
        logger.error("%s: %s", cfg.name, e)
        sys.exit(1)


if __name__ == "__main__":
    main()
