"""The serving benchmark's workload: seeded synthetic requests, their arrival times, and what the
client measured of each (``BenchRequest``). Shared by every backend of ``bench.serving``."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int
    seed: int = 0  # the sampling seed sent with it
    rid: str = ""
    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    done_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent_at

    @property
    def latency(self) -> float:
        assert self.done_at is not None
        return self.done_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with fewer than two."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def prompt_text(self) -> str:
        """The prompt as text (a chat message): token ids are written out as numbers."""
        return self.prompt if isinstance(self.prompt, str) else " ".join(map(str, self.prompt))


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    input_len: tuple[int, int]  # inclusive range; characters with text prompts, else tokens
    output_len: tuple[int, int]
    vocab_size: int | None  # token ids are drawn below it; None: text prompts
    seed: int


def make_requests(workload: Workload, rng: np.random.Generator) -> list[BenchRequest]:
    n = workload.num_prompts
    input_lens = rng.integers(workload.input_len[0], workload.input_len[1], endpoint=True, size=n)
    output_lens = rng.integers(workload.output_len[0], workload.output_len[1], endpoint=True, size=n)
    letters = np.array(list(string.ascii_lowercase + " "))
    requests = []
    for i, (n_in, n_out) in enumerate(zip(input_lens.tolist(), output_lens.tolist(), strict=True)):
        if workload.vocab_size is None:
            prompt: str | list[int] = "".join(rng.choice(letters, size=n_in).tolist())
        else:
            prompt = rng.integers(0, workload.vocab_size, size=n_in).tolist()
        requests.append(BenchRequest(prompt=prompt, output_len=n_out, seed=workload.seed + i))
    return requests


def arrival_offsets(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Seconds after the start at which each request is sent: Poisson arrivals, or all at once."""
    if math.isinf(rate):
        return [0.0] * n
    return np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()


def workload_at(workload: Workload, rate: float) -> tuple[list[BenchRequest], list[float]]:
    """The requests and their send offsets, drawn from ``workload.seed`` alone: the same flags
    send the same requests, whichever backend sends them."""
    rng = np.random.default_rng(workload.seed)
    requests = make_requests(workload, rng)
    return requests, arrival_offsets(len(requests), rate, rng)
