"""The command-line client and the serving benchmark (its zmq backend) against the fake deployment."""

from __future__ import annotations

import json
import math

import numpy as np

from bench import serving
from bench.serving_workload import Workload, arrival_offsets, make_requests
from tokenizer_proc import cli


def test_cli_streams_each_answer_with_timings(deployment, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("from a file\n\n")
    code = cli.main(
        ["--addr", deployment.cfg.client_addr, "--max-new-tokens", "5", "--file", str(prompts), "hi"]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "Hello" and out[2] == "Hello"
    assert out[1].startswith("[length | ttft ") and "3 prompt + 5 tokens" in out[1]
    assert "12 prompt + 5 tokens" in out[3]  # BOS + "from a file"
    assert [r.input_ids[1:] for r in deployment.fake.requests()] == [list(b"hi"), list(b"from a file")]


def test_cli_reports_errors_and_status(deployment, capsys):
    assert cli.main(["--addr", deployment.cfg.client_addr, "--max-new-tokens", "0", "x"]) == 1
    assert "invalid_request" in capsys.readouterr().err
    assert cli.main(["--addr", deployment.cfg.client_addr, "--status"]) == 0
    assert json.loads(capsys.readouterr().out)["ready"] is True


def test_requests_are_seeded_and_in_range():
    workload = Workload(num_prompts=20, input_len=(3, 9), output_len=(2, 4), vocab_size=320, seed=0)
    a = make_requests(workload, np.random.default_rng(1))
    b = make_requests(workload, np.random.default_rng(1))
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.output_len <= 4 for r in a)
    assert all(0 <= t < workload.vocab_size for r in a for t in r.prompt)
    offsets = arrival_offsets(50, 100.0, np.random.default_rng(0))
    assert offsets == sorted(offsets) and 0.1 < offsets[-1] < 2.0


def test_benchmark_reports_throughput_and_latencies(deployment, tmp_path, capsys):
    output = tmp_path / "serving.json"
    argv = ["--addr", deployment.cfg.client_addr, "--num-prompts", "6", "--input-len", "4", "8"]
    argv += ["--output-len", "2", "5", "--request-rate", "200", "--output", str(output), "--no-progress"]
    assert serving.main(argv) == 0
    assert "TTFT" in capsys.readouterr().out
    report = json.loads(output.read_text())
    results = report["results"]
    assert results["completed"] == 6 and results["failed"] == 0
    sent = deployment.fake.requests()
    assert results["input_tokens"] == sum(len(r.input_ids) for r in sent)
    assert results["output_tokens"] == sum(r.sampling.max_new_tokens for r in sent)
    assert all(r.sampling.ignore_eos for r in sent)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(results[key]) == {"mean", "p50", "p90", "p99"}
        assert results[key]["p50"] <= results[key]["p99"]
    assert results["ttft_ms"]["p99"] <= results["e2e_latency_ms"]["p99"]
    assert report["config"]["request_rate"] == [200.0]
    assert report["config"]["vocab_size"] == 320  # asked of the server (its status names the model)


def test_benchmark_text_prompts_all_at_once(deployment):
    args = serving.parse_args(["--addr", deployment.cfg.client_addr, "--num-prompts", "4", "--text"])
    args.input_len, args.output_len, args.no_progress = (5, 5), (3, 3), True
    (run,) = serving.run_benchmark(args)["runs"]
    results = run["results"]
    assert results["completed"] == 4 and results["output_tokens"] == 12
    assert results["input_tokens"] == 4 * 6  # BOS + 5 characters
    assert not math.isnan(results["request_throughput"])
