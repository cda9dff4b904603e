"""From a validated generate command to what an instance receives.

``Admission`` knows the served model (from the first heartbeat that reports it, or from the
tokenizer when none does): it tokenizes and checks the prompt against the model's limits,
and fills in the sampling parameters the instance relies on (EOS ids, a seed).
"""

from __future__ import annotations

import logging
import secrets

from protocol.config import EMBEDDED
from protocol.messages import ModelInfo, SamplingParams
from protocol.validation import SEED_LIMIT
from tokenizer_proc.tokenizer import ByteTokenizer, Tokenizer
from tokenizer_proc.validation import (
    GenerateCommand,
    InvalidRequest,
    ModelLimits,
    check_prompt,
    check_text_size,
)

log = logging.getLogger("pdserve.frontend")


class Admission:
    def __init__(self, tokenizer: Tokenizer, context_length: int | None) -> None:
        """``context_length``: the configured override of the model's, if any."""
        self.tokenizer = tokenizer
        self.limits: ModelLimits | None = None
        self._context_length = context_length
        self._eos_ids = list(tokenizer.eos_token_ids)
        self._rng = secrets.SystemRandom()

    def learn_model(self, model: ModelInfo) -> None:
        context_len = self._context_length or model.context_len
        self.limits = ModelLimits(vocab_size=model.vocab_size, context_len=context_len)
        self._eos_ids = list(dict.fromkeys([*self.tokenizer.eos_token_ids, *model.eos_token_ids]))
        if isinstance(self.tokenizer, ByteTokenizer) and model.vocab_size != self.tokenizer.vocab_size:
            log.warning(
                "byte tokenizer expects %d tokens; the model has %d",
                self.tokenizer.vocab_size,
                model.vocab_size,
            )
        log.info(
            "model %s: vocab %d, context %d, eos %s", model.name, model.vocab_size, context_len, self._eos_ids
        )

    def assume_tokenizer_limits(self) -> None:
        """Limits when no instance reported its model: the tokenizer's vocabulary, the
        configured (or embedded default's) context length."""
        log.warning("no instance reported its model: limits come from the tokenizer")
        context_len = self._context_length
        if context_len is None and isinstance(self.tokenizer, ByteTokenizer):
            context_len = EMBEDDED.context_len
        self.limits = ModelLimits(vocab_size=self.tokenizer.vocab_size, context_len=context_len)

    def input_ids(self, cmd: GenerateCommand) -> list[int]:
        """The prompt's token ids, checked against the model's limits."""
        assert self.limits is not None, "admission before the model is known"
        if cmd.input_ids is not None:
            ids = cmd.input_ids
        elif self.tokenizer.has_text:
            check_text_size(cmd.text or "", self.limits)
            ids = self.tokenizer.encode(cmd.text or "")
        else:
            raise InvalidRequest("this model has no tokenizer.json: send input_ids instead of text")
        if cmd.sampling.stop and not self.tokenizer.has_text:
            raise InvalidRequest("stop strings need a tokenizer (this model has none): use stop_token_ids")
        check_prompt(ids, cmd.sampling, self.limits)
        return ids

    def sampling_params(self, cmd: GenerateCommand) -> SamplingParams:
        """EOS ids join the stop ids unless ``ignore_eos``; a seed is minted when none is
        given, so a request's random stream never depends on its batch."""
        s = cmd.sampling
        stop_ids = s.stop_token_ids if s.ignore_eos else [*s.stop_token_ids, *self._eos_ids]
        return SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=-1 if s.top_k == 0 else s.top_k,
            seed=s.seed if s.seed is not None else self._rng.randrange(SEED_LIMIT),
            stop_token_ids=list(dict.fromkeys(stop_ids)),
            ignore_eos=s.ignore_eos,
            return_logprob=cmd.return_logprob,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty,
            min_p=s.min_p,
            top_logprobs=s.top_logprobs,
        )
