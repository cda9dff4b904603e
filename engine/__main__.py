"""``python -m engine --config '<WorkerConfig JSON>'``: the worker process of an instance."""

from engine.worker_process import run_worker
from protocol.config import WorkerConfig
from protocol.process import start_process

if __name__ == "__main__":
    run_worker(start_process("python -m engine", WorkerConfig, __doc__))
