"""A whole deployment (real front end, real scheduler processes) in front of a fake GPU worker
process that sleeps a fixed time per step: 512 streaming requests, all running at once, each
gets exactly its tokens, and afterwards the instance holds no page, slot or request."""

from __future__ import annotations

from bench.overhead_procs import measure_deployment


def test_512_running_requests_complete_with_their_token_counts_and_no_leak():
    result = measure_deployment(running=512, step_ms=5.0, tokens=64, prompt_len=8)
    assert result.requests == 512
    assert result.tokens == 512 * 64
    assert result.token_counts_right  # every request: 64 tokens, finish reason "length", no error
    assert result.max_batch == 512  # the whole batch decoded together
    assert result.leak_free  # status after: free + cached pages == total, nothing decoding or pending
