"""``python -m decode_worker --config '<WorkerConfig JSON>'``: the worker of a decode instance."""

from decode_worker.worker import run_decode_worker
from protocol.config import WorkerConfig
from protocol.process import start_process

if __name__ == "__main__":
    run_decode_worker(start_process("python -m decode_worker", WorkerConfig, __doc__))
