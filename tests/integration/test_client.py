"""DynamoClient: the same API, answers and errors over HTTP and straight over NATS."""

from __future__ import annotations

import pytest

from dynamo_bus.errors import InvalidRequest, ModelNotFound, NoWorker, Overloaded
from dynamo_bus.serving.client import DynamoClient

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name a colour."}]


async def _both(s, model_dir):
    return [DynamoClient(s.base_url), DynamoClient(s.nats_url, model_dir=str(model_dir.path))]


async def test_same_answers_over_http_and_nats(stack, model_dir) -> None:
    s = await stack(workers=2)
    texts, streamed = [], []
    for client in await _both(s, model_dir):
        async with client:
            full = await client.chat.completions.create(model=MODEL, messages=CHAT,
                                                        max_tokens=10, seed=5)
            texts.append(full.choices[0].message.content)
            assert full.usage.completion_tokens == 10
            stream = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=10, seed=5, stream=True,
                stream_options={"include_usage": True})
            parts, usage = [], None
            async for chunk in stream:
                usage = chunk.usage or usage
                parts += [c.delta.content or "" for c in chunk.choices]
            streamed.append("".join(parts))
            assert usage.completion_tokens == 10
            comp = await client.completions.create(model=MODEL, prompt="x", max_tokens=3)
            assert comp.choices[0].finish_reason == "length"
            assert await client.models.list() == [MODEL]
    assert texts[0] == texts[1] == streamed[0] == streamed[1]


async def test_same_errors_over_http_and_nats(stack, model_dir) -> None:
    s = await stack(workers=1)
    for client in await _both(s, model_dir):
        async with client:
            with pytest.raises(ModelNotFound) as nf:
                await client.chat.completions.create(model="nope", messages=CHAT)
            assert nf.value.status == 404
            with pytest.raises(InvalidRequest) as bad:
                await client.chat.completions.create(model=MODEL, messages=CHAT, top_p=7)
            assert (bad.value.status, bad.value.param) == (400, "top_p")


async def test_no_worker_over_nats_is_a_503(stack, model_dir) -> None:
    s = await stack(workers=0)
    async with DynamoClient(s.nats_url, model_dir=str(model_dir.path)) as client:
        with pytest.raises(Overloaded) as exc:
            await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    assert isinstance(exc.value, NoWorker) and exc.value.status == 503
