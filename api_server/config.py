"""The HTTP server's configuration and command line (``python -m api_server``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from functools import cached_property

from protocol.config import DEFAULT_MODEL_PATH
from protocol.model_source import resolve_model
from tokenizer_proc.client import DEFAULT_ADDR


@dataclass(frozen=True)
class ApiServerConfig:
    frontend_addr: str = DEFAULT_ADDR
    host: str = "127.0.0.1"
    port: int = 30000
    fd: int | None = None  # a listening socket inherited from launch.py: served instead of host:port
    model_path: str = DEFAULT_MODEL_PATH
    chat_template: str | None = None  # a Jinja file that overrides the model's template
    api_key: str | None = None  # when set, /v1/* and /generate need "Authorization: Bearer KEY"
    served_model_name: str | None = None
    max_body_bytes: int = 16 << 20
    response_timeout_s: float = 300.0  # the longest wait for the front end's next reply
    health_timeout_s: float = 5.0
    shutdown_timeout_s: float = 5.0  # on SIGTERM, open streams get this long, then are aborted
    log_level: str = "info"

    @cached_property
    def model_name(self) -> str:
        """The name clients use in ``model``: the served name, or the model path's last part."""
        if self.served_model_name:
            return self.served_model_name
        return resolve_model(self.model_path).name

    @cached_property
    def accepted_model_names(self) -> frozenset[str]:
        """``model_name``, and the model path as given."""
        return frozenset(n for n in (self.model_name, self.model_path) if n)


def parse_args(argv: list[str] | None = None) -> ApiServerConfig:
    defaults = ApiServerConfig()
    p = argparse.ArgumentParser(prog="python -m api_server", description="OpenAI-compatible HTTP server")
    p.add_argument("--frontend-addr", default=defaults.frontend_addr, help="the pdserve front end's address")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--fd", type=int, default=None,
                   help="serve on this inherited listening socket instead of binding --host:--port "
                   "(launch.py binds the port once for all its HTTP servers)")
    p.add_argument("--model-path", default=defaults.model_path,
                   help="the served model's directory, GGUF file or packaged name (default %(default)s)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file (overrides the model's)")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                   help="require this bearer token (default: $PDSERVE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--response-timeout", type=float, default=defaults.response_timeout_s,
                   help="seconds to wait for the front end's next reply")
    p.add_argument("--log-level", default=defaults.log_level,
                   choices=["critical", "error", "warning", "info", "debug"])
    a = p.parse_args(argv)
    return ApiServerConfig(
        frontend_addr=a.frontend_addr,
        host=a.host,
        port=a.port,
        fd=a.fd,
        model_path=a.model_path,
        chat_template=a.chat_template,
        api_key=a.api_key,
        served_model_name=a.served_model_name,
        max_body_bytes=a.max_body_bytes,
        response_timeout_s=a.response_timeout,
        log_level=a.log_level,
    )
