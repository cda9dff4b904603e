#!/usr/bin/env bash
# The GPU check: the GPU tests and the benchmarks, each step time-bounded, results written as
# they come to one folder ($OUT when set, else bench/results/<date>-<device>/), then one table.
#
#   scripts/gpu_check.sh [STEP...]     (default: all)
#
# Steps: tests     tests/gpu except the end-to-end file (kernels, kvtransfer, CUDA graphs)
#        e2e_cuda  tests/gpu/test_e2e_gpu.py (greedy vs reference and transformers, float32,
#                  CUDA graphs on and off; bf16 smoke), tests/gpu/test_disagg_gpu.py (1P1D on
#                  the one GPU, cuda_ipc and zmq) and tests/gpu/test_tensor_parallel_gpu.py
#                  (--tp-size 2, graphs on and off; skipped with fewer than two GPUs)
#        e2e       tests/e2e (the CPU end-to-end suite; --device auto puts its servers on CUDA)
#        kernels one_batch transfer serving   the benchmarks (bench/*.py); serving is
#                  serving_unified then serving_pd (1P1D), each also a step of its own
#        report    the table of what the results folder holds (also printed after any step)
#        all       every step above, in that order
#
# Each step fits the device's 10-minute command limit on its own; give a machine with such a
# limit one or two steps per command. Steps go on after a failed step; the exit status is
# non-zero when any failed. Wheels in .whl/ (pyzmq; see ../shared/tools/fetch-gpu-wheels.sh)
# are installed first when python3 cannot import zmq.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=bench/model_configs/llama-3-8b  # a copy of ../shared/model-configs/llama-3-8b/config.json

setup() {
  if ! "$PY" -c 'import zmq' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c 'import zmq, torch; assert torch.cuda.is_available(), "no CUDA device"' || return 1
  DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))')
  RESULTS=${OUT:-bench/results/$(date -u +%Y-%m-%d)-$DEVICE}
  mkdir -p "$RESULTS"
  echo "results: $RESULTS"
}

# run NAME SECONDS CMD...: the command under a time limit, its output also in $RESULTS/NAME.log
run() {
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout --kill-after=15 "$seconds" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  return "$rc"
}

# pytest_step NAME FILES...: pytest under the step limit, with a JUnit record beside its log
pytest_step() {
  local name=$1
  shift
  run "$name" 540 "$PY" -m pytest -q -p no:cacheprovider "$@" --junitxml="$RESULTS/$name.xml"
}

step_tests() {
  pytest_step gpu-tests tests/gpu --ignore=tests/gpu/test_e2e_gpu.py --ignore=tests/gpu/test_disagg_gpu.py \
    --ignore=tests/gpu/test_tensor_parallel_gpu.py
}

step_e2e_cuda() {
  pytest_step e2e-cuda-tests tests/gpu/test_e2e_gpu.py tests/gpu/test_disagg_gpu.py \
    tests/gpu/test_tensor_parallel_gpu.py
}

step_e2e() {
  pytest_step e2e-tests tests/e2e
}

step_kernels() {
  run kernels 420 "$PY" -m bench.kernels --output "$RESULTS/kernels.json"
}

step_one_batch() {
  run one_batch 480 "$PY" -m bench.one_batch --model-path "$MODEL" --output "$RESULTS/one_batch.json"
}

step_transfer() {
  run kvtransfer 300 "$PY" -m bench.kvtransfer --output "$RESULTS/kvtransfer.json"
}

# serve_and_drive NAME LAUNCH_FLAGS...: serve the llama-3-8b-shaped dummy model, then drive it at
# full load (over ZMQ, then the same requests over the HTTP API: its cost) and at a fixed rate
serve_and_drive() {
  local name=$1 port=31000 rc=0
  shift
  local log="$RESULTS/$name-server.log"
  timeout --kill-after=20 370 "$PY" launch.py "$@" --port "$port" --model-path "$MODEL" --load-format dummy \
    >"$log" 2>&1 &
  local server=$!
  local waited=0
  until grep -q "pdserve ready" "$log"; do
    if ! kill -0 "$server" 2>/dev/null || [ "$waited" -ge 150 ]; then
      echo "the server did not get ready"; tail -n 30 "$log"; kill -TERM "$server" 2>/dev/null
      wait "$server" 2>/dev/null; return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  echo "$name server ready after ${waited}s"
  local common=(--vocab-size 128000 --no-progress --timeout 120)
  local zmq=(--addr "tcp://127.0.0.1:$((port + 1))")
  run "$name-max" 100 "$PY" -m bench.serving "${zmq[@]}" "${common[@]}" --num-prompts 256 --input-len 128 1024 \
    --output-len 64 256 --request-rate inf --output "$RESULTS/$name-max.json" || rc=1
  run "$name-max-http" 100 "$PY" -m bench.serving --backend openai --base-url "http://127.0.0.1:$port/v1" \
    "${common[@]}" --num-prompts 256 --input-len 128 1024 \
    --output-len 64 256 --request-rate inf --output "$RESULTS/$name-max-http.json" || rc=1
  run "$name-rate" 80 "$PY" -m bench.serving "${zmq[@]}" "${common[@]}" --num-prompts 200 --input-len 128 1024 \
    --output-len 64 256 --request-rate 16 --output "$RESULTS/$name-rate16.json" || rc=1
  kill -TERM "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  return "$rc"
}

step_serving_unified() {
  serve_and_drive serving --mode unified
}

# 1P1D on the one GPU (each worker's KV pool capped so both 8B copies fit)
step_serving_pd() {
  serve_and_drive serving-1p1d --mode pd --num-prefill 1 --num-decode 1 --transfer-backend cuda_ipc \
    --max-total-tokens 131072
}

# unified next to 1P1D (two steps when one command's time limit is tight)
step_serving() {
  local rc=0
  step_serving_unified || rc=1
  step_serving_pd || rc=1
  return "$rc"
}

step_report() {
  "$PY" -m bench.report "$RESULTS"
}

main() {
  local steps=("$@")
  [ ${#steps[@]} -eq 0 ] && steps=(all)
  [ "${steps[*]}" = all ] && steps=(tests e2e_cuda e2e kernels one_batch transfer serving)
  for s in "${steps[@]}"; do
    case $s in
      tests|e2e_cuda|e2e|kernels|one_batch|transfer|serving|serving_unified|serving_pd|report) ;;
      *) echo "unknown step: $s (tests e2e_cuda e2e kernels one_batch transfer serving" \
           "serving_unified serving_pd report all)" >&2
         exit 2 ;;
    esac
  done
  setup || { echo "set-up failed" >&2; exit 1; }
  local failed=()
  for s in "${steps[@]}"; do
    "step_$s" || failed+=("$s")
  done
  [ "${steps[*]}" = report ] || step_report
  if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
  fi
}

main "$@"
