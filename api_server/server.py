"""Runs the HTTP server: uvicorn serving ``create_app(config)`` on one asyncio event loop."""

from __future__ import annotations

import logging

import uvicorn

from api_server.app import create_app
from api_server.config import ApiServerConfig

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def serve(config: ApiServerConfig) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers; in the main thread)."""
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    app = create_app(config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=config.shutdown_timeout_s,
    )
