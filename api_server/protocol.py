"""The request bodies the HTTP server accepts: OpenAI's completions and chat completions (with
SGLang/vLLM sampling extensions) and SGLang's native ``/generate``, as pydantic models.

Models are strict (no string-to-number coercion) and refuse unknown fields, as OpenAI does. The
checks that span several fields, and the refusal of what is not supported yet, are in
``api_server.sampling``; the answers are built in ``api_server.responses``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

MAX_N = 16  # parallel samples of one prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 128  # prompts x n: the front-end requests one HTTP request may start
MAX_STOP = 16  # stop strings
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024
SEED_LIMIT = 1 << 63  # the front end's seeds are in [0, 2**63)

Prompt = str | list[str] | list[int] | list[list[int]]


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list (OpenAI takes one string or a list)."""
    return [stop] if isinstance(stop, str) else list(stop or [])


def _checked_stop(stop: str | list[str] | None) -> str | list[str] | None:
    stops = stop_list(stop)
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stop


Stop = Annotated[str | list[str] | None, AfterValidator(_checked_stop)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The fields both OpenAI endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (SGLang / vLLM)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Prompt:
        if isinstance(prompt, str) or _ints(prompt):
            return prompt
        if isinstance(prompt, list) and prompt and (
            all(isinstance(p, str) for p in prompt) or all(_ints(p) for p in prompt)
        ):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
            return prompt
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        if isinstance(self.prompt, str) or _ints(self.prompt):
            return [self.prompt]
        return list(self.prompt)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class NativeSampling(_Body):
    """``sampling_params`` of SGLang's ``/generate``: the front end's own."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Stop = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)


class GenerateRequest(_Body):
    """SGLang's native ``POST /generate`` (one prompt)."""

    text: StrictStr | None = None
    input_ids: list[StrictInt] | None = None
    sampling_params: NativeSampling = Field(default_factory=NativeSampling)
    stream: bool = False
    return_logprob: bool = False
    rid: str | None = None  # accepted for SGLang compatibility; rids are minted here


def _ints(value: Any) -> bool:
    """A non-empty list of token ids (``bool`` is not an id)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    )

