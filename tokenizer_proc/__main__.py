"""``python -m tokenizer_proc --config '<FrontendConfig as JSON>'``: run the front end."""

from __future__ import annotations

import argparse
import logging

from protocol.config import FrontendConfig, config_from_json
from protocol.process import die_with_parent
from tokenizer_proc.frontend import run_frontend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer_proc", description=__doc__)
    parser.add_argument("--config", required=True, help="FrontendConfig as JSON")
    cfg = config_from_json(FrontendConfig, parser.parse_args(argv).config)
    logging.basicConfig(
        level=cfg.args.log_level.upper(),
        format="%(asctime)s frontend %(levelname)s %(message)s",
    )
    die_with_parent()
    run_frontend(cfg)  # returns on SIGTERM / SIGINT after closing its sockets


if __name__ == "__main__":
    main()
