"""Runs the HTTP server: uvicorn serving ``create_app(config)`` on one asyncio event loop, on
``--host:--port`` or on a listening socket inherited from launch.py (``--fd``)."""

from __future__ import annotations

import logging
import socket

import uvicorn

from api_server.app import create_app
from api_server.config import ApiServerConfig

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def serve(config: ApiServerConfig) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers; in the main thread)."""
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            access_log=False,
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        )
    )
    sockets = None if config.fd is None else [socket.socket(fileno=config.fd)]
    server.run(sockets=sockets)
