"""``python -m tokenizer_proc --config '<FrontendConfig JSON>'``: the front end."""

from protocol.config import FrontendConfig
from protocol.process import start_process
from tokenizer_proc.frontend import run_frontend


def main(argv: list[str] | None = None) -> None:
    # The front end handles SIGTERM itself: it answers live requests before closing.
    run_frontend(start_process("python -m tokenizer_proc", FrontendConfig, __doc__, argv=argv,
                               sigterm_exits=False))


if __name__ == "__main__":
    main()
