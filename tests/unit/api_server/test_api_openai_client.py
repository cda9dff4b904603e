"""The official ``openai`` client, sync and async, streaming and not, against the HTTP server in
front of a real unified deployment; greedy answers equal those of the ZMQ client."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.unit.api_server.conftest import MODEL, TEMPLATE
from tokenizer_proc.chat_template import ChatTemplate

PROMPT = "The quick brown fox"
MAX_TOKENS = 8


@pytest.fixture()
def client(api, zmq_client):
    with openai.OpenAI(base_url=api.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def complete(client, prompt=PROMPT, **params):
    """``completions.create`` with this module's defaults (greedy, MAX_TOKENS)."""
    return client.completions.create(**{"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                        "temperature": 0, **params})


def greedy(zmq_client, text=None, input_ids=None, max_new_tokens=MAX_TOKENS, **params) -> dict:
    return zmq_client.generate(text, input_ids, max_new_tokens=max_new_tokens, temperature=0, **params)


def test_completion_text_matches_zmq_client(client, zmq_client):
    want = greedy(zmq_client, PROMPT, return_logprob=True)
    got = complete(client, logprobs=0)
    [choice] = got.choices
    assert choice.text == want["text"]
    assert choice.finish_reason == want["finish_reason"] == "length"
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in want["token_ids"]]
    assert choice.logprobs.token_logprobs == pytest.approx(want["logprobs"], abs=1e-4)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == MAX_TOKENS
    assert got.usage.total_tokens == got.usage.prompt_tokens + MAX_TOKENS
    assert got.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_token_ids_and_prompt_lists(client, zmq_client):
    ids = [[256, 72, 105], [256, 65, 66, 67, 68]]
    want = [greedy(zmq_client, input_ids=p)["text"] for p in ids]
    got = complete(client, ids[0])
    assert got.choices[0].text == want[0]
    got = complete(client, ids)
    assert [c.text for c in got.choices] == want and [c.index for c in got.choices] == [0, 1]
    assert got.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    texts = ["Hello", "World!"]
    got = complete(client, texts)
    assert [c.text for c in got.choices] == [greedy(zmq_client, t)["text"] for t in texts]


def test_n_samples_are_seeded_in_turn(client, zmq_client):
    got = complete(client, n=3, seed=7, temperature=1.0, logprobs=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for j, choice in enumerate(got.choices):
        want = zmq_client.generate(PROMPT, max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7 + j)
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in want["token_ids"]], j
    assert got.usage.completion_tokens == 3 * MAX_TOKENS
    assert got.usage.prompt_tokens == len(PROMPT) + 1  # counted once; byte tokens plus BOS


def test_stop_strings_and_max_tokens(client, zmq_client):
    full = greedy(zmq_client, PROMPT, max_new_tokens=12)["text"]
    stop = full[3:5]
    want = greedy(zmq_client, PROMPT, max_new_tokens=12, stop=[stop])
    got = complete(client, max_tokens=12, stop=stop)
    assert got.choices[0].text == want["text"] and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    got = complete(client, max_tokens=12, stop=["\x00\x01", stop])
    assert got.choices[0].text == want["text"]
    got = complete(client, max_tokens=3)
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"


def test_echo_and_extensions(client, zmq_client):
    want = greedy(zmq_client, PROMPT, ignore_eos=True, top_k=1)["text"]
    extensions = {"ignore_eos": True, "top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0}
    got = complete(client, echo=True, extra_body=extensions)
    assert got.choices[0].text == PROMPT + want


def test_streamed_completion_with_usage(client, zmq_client):
    want = greedy(zmq_client, PROMPT)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_matches_zmq_client_on_rendered_prompt(client, zmq_client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = ChatTemplate(TEMPLATE).render(messages, add_generation_prompt=True)
    want = greedy(zmq_client, prompt, return_logprob=True)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=MAX_TOKENS,
                                         temperature=0, logprobs=True)
    [choice] = got.choices
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert [e.token for e in choice.logprobs.content] == [f"token_id:{t}" for t in want["token_ids"]]
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert choice.finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, n=2,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == want["text"]
        assert mine[-1].finish_reason == "length" and mine[-1].delta.content is None
    assert chunks[-1].usage.completion_tokens == 2 * MAX_TOKENS


def test_async_client_runs_requests_concurrently(api, zmq_client):
    prompts = [f"prompt number {i}" for i in range(6)]
    want = [greedy(zmq_client, p)["text"] for p in prompts]

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=api.base_url + "/v1", api_key="unused", max_retries=0) as c:

            async def one(p: str, stream: bool) -> str:
                r = await c.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=stream)
                if not stream:
                    return r.choices[0].text
                return "".join([chunk.choices[0].text async for chunk in r])

            return await asyncio.gather(*(one(p, i % 2 == 0) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == want
