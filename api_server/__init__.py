"""pdserve's OpenAI-compatible HTTP server: a FastAPI app in front of the pdserve front end, which
it reaches over the front end's ZMQ client protocol (docs/design.md, "Wire protocol").

    python -m api_server --frontend-addr tcp://127.0.0.1:30001 --port 30000 --model-path PATH

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` and SGLang's native ``POST /generate``. ``serve(config)`` runs it (launch.py
calls it in a child process).
"""

from api_server.config import ApiServerConfig, parse_args
from api_server.server import serve

__all__ = ["ApiServerConfig", "parse_args", "serve"]
