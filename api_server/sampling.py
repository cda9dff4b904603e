"""What an OpenAI request asks of the front end: the checks that span fields, the refusal of what
is not supported yet (each naming its field), and the front-end generate requests it becomes.
The ranges of the sampling values are checked by the front end (``protocol/validation.py``)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from api_server.errors import ApiError, invalid, not_supported
from api_server.generation import GenerateSpec
from api_server.protocol import (
    MAX_CHOICES,
    SEED_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    NativeSampling,
    SamplingFields,
    stop_list,
)

T = TypeVar("T", bound=BaseModel)


def parse_body(model: type[T], body: bytes) -> T:
    """``body`` as ``model``; a malformed or invalid body is a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> ApiError:
    first = e.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return invalid(f"unrecognized request argument supplied: {param}", param)
    if first["type"] == "json_invalid":
        return invalid(f"the request body is not valid JSON: {first['msg']}")
    msg = first["msg"].removeprefix("Value error, ")
    return invalid(f"{param}: {msg}" if param else f"request body: {msg}", param)


def check_openai(req: SamplingFields) -> None:
    if req.logit_bias:
        raise not_supported("logit_bias", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options: only allowed when stream is true", "stream_options")
    if req.seed is not None and req.seed + req.n > SEED_LIMIT:
        message = f"seed: seed + n - 1 must be below 2**63 (sample i is seeded seed + i), got {req.seed}"
        raise invalid(message, "seed")


def check_completion(req: CompletionRequest) -> None:
    check_openai(req)
    prompts = len(req.prompts())
    if prompts * req.n > MAX_CHOICES:
        raise invalid(f"n: prompts x n must be at most {MAX_CHOICES}, got {prompts} x {req.n}", "n")
    if req.echo and not all(isinstance(p, str) for p in req.prompts()):
        raise not_supported("echo", "echo of token id prompts")
    if req.echo and req.logprobs is not None:
        raise not_supported("echo", "echo with logprobs (prompt logprobs)")
    if req.best_of is not None and req.best_of != req.n:
        raise not_supported("best_of", "best_of other than n")
    if req.suffix:
        raise not_supported("suffix", "suffix")


def check_chat(req: ChatCompletionRequest) -> None:
    check_openai(req)
    if req.top_logprobs and not req.logprobs:
        raise invalid("top_logprobs: logprobs must be true when top_logprobs is used", "top_logprobs")
    if req.tools:
        raise not_supported("tools", "tool calling")
    if req.tool_choice not in (None, "none"):
        raise not_supported("tool_choice", "tool calling")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise not_supported("response_format", "a response_format other than text")


def openai_specs(
    req: SamplingFields, prompts: list[str | list[int]], max_tokens: int | None, logprobs: bool,
    top_logprobs: int | None = None,
) -> list[GenerateSpec]:
    """``n`` front-end requests per prompt, prompt-major (choice ``i * n + j`` is sample ``j`` of
    prompt ``i``); sample ``j`` is seeded ``seed + j``, so the samples differ but repeat.
    ``top_logprobs``: alternatives per token (chat's ``top_logprobs``, completions' ``logprobs``)."""
    specs = []
    for prompt in prompts:
        for j in range(req.n):
            params = _sampling_params(
                max_new_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=None if req.seed is None else req.seed + j,
                stop=stop_list(req.stop),
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                **_extra_sampling(req),
                top_logprobs=top_logprobs or None,
            )
            text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
            specs.append(GenerateSpec(text, ids, params, logprobs))
    return specs


def native_sampling(s: NativeSampling) -> dict[str, Any]:
    return _sampling_params(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop=stop_list(s.stop),
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        **_extra_sampling(s),
    )


def _extra_sampling(s: SamplingFields | NativeSampling) -> dict[str, Any]:
    """Penalties and min_p, the same fields in OpenAI's and SGLang's requests."""
    return {
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "repetition_penalty": s.repetition_penalty,
        "min_p": s.min_p,
    }


def _sampling_params(**params: Any) -> dict[str, Any]:
    """The front end's ``sampling_params``: unset fields are left out (its defaults apply)."""
    return {k: v for k, v in params.items() if v is not None and v != []}
