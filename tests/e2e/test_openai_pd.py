"""The official ``openai`` client, sync and async, streaming and not, against a disaggregated
deployment (``--mode pd``) of the default model, SmolLM2-135M-Instruct: chat and completions,
``n`` > 1, logprobs with top logprobs (the first token's cross the KV data plane), stop
strings, usage; greedy output equal to the ZMQ client's and to a unified deployment's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.server import Server, running_server, wait_no_leak

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
MAX_TOKENS = 12
TOP = 3


def _model_installed() -> None:
    try:
        import gguf  # noqa: F401

        from protocol.model_source import resolve_model

        resolve_model(MODEL)
    except (ImportError, FileNotFoundError) as e:  # scripts/setup.sh installs both
        pytest.skip(f"the default model is not installed: {e}")


@pytest.fixture(scope="module")
def pd() -> Iterator[Server]:
    _model_installed()
    with running_server("--num-prefill", "1", "--num-decode", "1", mode="pd", model=MODEL) as server:
        yield server


@pytest.fixture(scope="module")
def unified_chat() -> openai.types.chat.ChatCompletion:
    """The greedy chat answer of a unified deployment, with top logprobs, to compare with pd's."""
    _model_installed()
    with running_server(model=MODEL) as server, client_of(server) as client:
        return chat(client)


def client_of(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **params) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                          temperature=0, logprobs=True, top_logprobs=TOP, **params)


def test_chat_with_top_logprobs_equals_unified(pd: Server, unified_chat) -> None:
    with client_of(pd) as client:
        got = chat(client)
    [choice], [want] = got.choices, unified_chat.choices
    assert "Paris" in choice.message.content
    assert choice.message.content == want.message.content
    content = choice.logprobs.content
    assert len(content) == got.usage.completion_tokens  # the first token's came from the prefill side
    assert all(len(t.top_logprobs) == TOP for t in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the top one is the one sampled
    assert [t.logprob for t in content] == pytest.approx([t.logprob for t in want.logprobs.content], abs=1e-3)
    first, first_want = content[0].top_logprobs, want.logprobs.content[0].top_logprobs
    assert [t.token for t in first] == [t.token for t in first_want]
    assert [t.logprob for t in first] == pytest.approx([t.logprob for t in first_want], abs=1e-3)
    with pd.client() as zmq:
        wait_no_leak(zmq)


def test_streamed_chat_with_usage_equals_the_whole_answer(pd: Server) -> None:
    with client_of(pd) as client:
        whole = chat(client)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_n_stop_and_the_zmq_client_agree(pd: Server) -> None:
    with client_of(pd) as client, pd.client() as zmq:
        want = zmq.generate(PROMPT, max_new_tokens=MAX_TOKENS, temperature=0, return_logprob=True)
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                        logprobs=0)
        assert got.choices[0].text == want["text"]
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(want["logprobs"], abs=1e-4)
        sampled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, n=3,
                                            temperature=1.0, seed=7)
        assert [c.index for c in sampled.choices] == [0, 1, 2]
        assert sampled.usage.completion_tokens == sum(
            len(zmq.generate(PROMPT, max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7 + i)["token_ids"])
            for i in range(3)
        )
        stop = want["text"].split()[1]  # a word of the greedy answer: it must end the text before it
        stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stop=[stop])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == want["text"][: want["text"].index(stop)]
        wait_no_leak(zmq)


def test_async_client_streams_concurrently(pd: Server) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{pd.http_url}/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(one(c, f"{PROMPT} {i}") for i in range(4)))

    texts = asyncio.run(main())
    with pd.client() as zmq:
        for i, text in enumerate(texts):
            assert text == zmq.generate(f"{PROMPT} {i}", max_new_tokens=MAX_TOKENS, temperature=0)["text"]
