#!/usr/bin/env bash
# The main job on the embedded default model: serve it (unified mode), stream an answer to a
# sample prompt through the command-line client, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-30000}
PROMPT=${1:-"The quick brown fox"}
log=$(mktemp)
.venv/bin/python launch.py --mode unified --port "$PORT" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
until grep -q "pdserve ready" "$log"; do
  if ! kill -0 $server 2>/dev/null; then cat "$log"; echo "the server failed to start" >&2; exit 1; fi
  sleep 0.5
done
grep "pdserve ready" "$log"
echo "(the embedded model has random weights, so its answer is gibberish; the pipeline is real)"
.venv/bin/python -m tokenizer_proc.cli --addr "tcp://127.0.0.1:$PORT" --max-new-tokens 48 \
  --temperature 0.8 --seed 1 "$PROMPT"
