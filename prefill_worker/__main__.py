"""``python -m prefill_worker --config '<WorkerConfig JSON>'``: the worker of a prefill instance."""

from __future__ import annotations

import argparse
import logging

from prefill_worker.worker import run_prefill_worker
from protocol.config import WorkerConfig, config_from_json
from protocol.process import die_with_parent, exit_on_sigterm


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m prefill_worker", description=__doc__)
    parser.add_argument("--config", required=True, help="WorkerConfig as JSON")
    cfg = config_from_json(WorkerConfig, parser.parse_args().config)
    logging.basicConfig(
        level=cfg.args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {cfg.name} %(name)s: %(message)s",
    )
    die_with_parent()
    exit_on_sigterm()
    run_prefill_worker(cfg)


if __name__ == "__main__":
    main()
