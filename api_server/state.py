"""What every route of the HTTP server shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from api_server.backend import FrontendBridge
from api_server.config import ApiServerConfig
from api_server.errors import INVALID_REQUEST, ApiError, invalid
from api_server.templates import ChatFormat
from tokenizer_proc.chat_template import ChatTemplateError


@dataclass
class ServerState:
    """What every route shares: one bridge to the front end, the chat format, the model's names."""

    config: ApiServerConfig
    bridge: FrontendBridge
    chat_format: ChatFormat | None
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str) -> None:
        if model not in self.config.accepted_model_names:
            raise ApiError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", INVALID_REQUEST,
                           "model", "model_not_found")

    def model_card(self) -> dict[str, Any]:
        name = self.config.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve"}

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of a conversation, rendered with the model's chat template."""
        if self.chat_format is None:
            raise invalid(
                "messages: the model has no chat template; start the server with --chat-template FILE "
                "or use /v1/completions",
                "messages",
                "no_chat_template",
            )
        try:
            return self.chat_format.prompt(messages)
        except ChatTemplateError as e:
            raise invalid(str(e), "messages") from None
