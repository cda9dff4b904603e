"""``python -m prefill_worker --config '<WorkerConfig JSON>'``: the worker of a prefill instance."""

from prefill_worker.worker import run_prefill_worker
from protocol.config import WorkerConfig
from protocol.process import start_process

if __name__ == "__main__":
    run_prefill_worker(start_process("python -m prefill_worker", WorkerConfig, __doc__))
