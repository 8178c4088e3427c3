"""Token streams of one frontend travel together: what an engine step produced for
several of its requests is one NATS message, and every stream still comes out whole."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_bus.bus.connection import connect
from dynamo_bus.bus.messages import RESPONSE, ChunkBatch, unbatch
from dynamo_bus.bus.subjects import Names
from dynamo_bus.serving.client import DynamoClient

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


async def test_a_steps_chunks_for_one_frontend_share_a_message(stack) -> None:
    s = await stack(workers=1, mock_speedup=50.0)
    nc = await connect(s.nats_url, name="watch")
    messages, batches = [], []

    async def seen(msg) -> None:
        delivery = RESPONSE.decode(msg.data)
        messages.append(delivery)
        if isinstance(delivery, ChunkBatch):
            batches.append({c.request_id for c in unbatch(delivery)})

    await nc.subscribe(Names(s.cfg.namespace).response_subjects("*"), cb=seen)

    async def one(client: DynamoClient, i: int) -> tuple[str, int]:
        stream = await client.completions.create(model=MODEL, prompt=f"story {i}",
                                                 max_tokens=30, seed=i, stream=True,
                                                 stream_options={"include_usage": True})
        text, tokens = "", 0
        async for part in stream:
            text += "".join(c.text for c in part.choices)
            tokens = part.usage.completion_tokens if part.usage else tokens
        return text, tokens

    async with DynamoClient(s.base_url) as client:
        together = await asyncio.gather(*(one(client, i) for i in range(6)))
        alone = [await one(client, i) for i in range(6)]
    await nc.flush()
    await nc.close()
    # The same answers as one request at a time, every token there.
    assert together == alone
    assert all(tokens == 30 for _, tokens in together)
    # Steps that served several requests sent their chunks as one message.
    assert any(len(ids) > 1 for ids in batches)
    chunks = sum(len(unbatch(m)) for m in messages)
    assert len(messages) < chunks
    # On the wire, each request's chunks come once, in order, without holes.
    ends: dict[str, int] = {}
    for item in (c for m in messages for c in unbatch(m)):
        assert item.index == ends.get(item.request_id, 0), item
        ends[item.request_id] = item.index + len(item.token_ids)
