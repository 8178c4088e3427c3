"""The frontend as an OpenAI client sees it: the real `openai` package, streaming and
unary, over the whole bus (frontend → JetStream → router → worker → core NATS)."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Say hello."}]


async def test_chat_unary_and_streaming_with_usage(stack) -> None:
    s = await stack(workers=2)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    full = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                                seed=7)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 5
    text = full.choices[0].message.content
    assert text

    stream = await client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, seed=7, stream=True,
        stream_options={"include_usage": True})
    parts, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    # The same seed gives the same text, streamed or not.
    assert "".join(parts) == text
    assert reasons[-1] == "length"
    assert usage is not None and usage.completion_tokens == 12
    await client.close()


async def test_completions_unary_and_streaming(stack) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    full = await client.completions.create(model=MODEL, prompt="Once upon a time",
                                           max_tokens=8, seed=3)
    assert full.usage.completion_tokens == 8
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time",
                                             max_tokens=8, seed=3, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == full.choices[0].text
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    await client.close()


async def test_stop_string_ends_the_text(stack) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    full = await client.completions.create(model=MODEL, prompt="abc", max_tokens=40, seed=11)
    text = full.choices[0].text
    stop = text[10:14]  # a piece from the middle of what the model says for this seed
    cut = await client.completions.create(model=MODEL, prompt="abc", max_tokens=40, seed=11,
                                          stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    await client.close()


async def test_two_hundred_concurrent_streams_all_finish(stack) -> None:
    s = await stack(workers=4)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 16, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one(i: int) -> tuple[int, bool, int]:
            async with http.post(s.base_url + "/chat/completions",
                                 json={**body, "seed": i}) as resp:
                raw = await resp.read()
            events = [e for e in raw.split(b"\n\n") if e.strip()]
            return resp.status, events[-1] == b"data: [DONE]", sum(
                b'"error"' in e for e in events)

        results = await asyncio.gather(*(one(i) for i in range(200)))
    assert [r for r in results if r != (200, True, 0)] == []


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"messages": CHAT, "temperature": 5}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "n": 2}, 400, "n"),
    ({"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": CHAT, "routing_strategy": "psychic"}, 400, "routing_strategy"),
    ({"messages": CHAT, "max_tokens": 9000}, 400, "max_tokens"),
])
async def test_bad_fields_are_named(stack, body, status, param) -> None:
    s = await stack(workers=1)
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/chat/completions", json={"model": MODEL, **body}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == status
    assert err["param"] == param
    assert param in err["message"]


async def test_error_statuses_through_the_openai_client(stack) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.chat.completions.create(model="gpt-9", messages=CHAT)
    with pytest.raises(openai.APIStatusError) as too_long:
        await client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=1)
    assert too_long.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    await client.close()
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json())["error"]["message"]


async def test_no_worker_is_503_and_health_says_so(stack) -> None:
    s = await stack(workers=0)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    assert exc.value.status_code == 503
    await client.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(s.base_url.removesuffix("/v1") + "/ready") as resp:
            assert resp.status == 503
        async with http.get(s.base_url.removesuffix("/v1") + "/live") as resp:
            assert resp.status == 200


async def test_health_lists_live_workers(stack) -> None:
    s = await stack(workers=2)
    async with aiohttp.ClientSession() as http:
        async with http.get(s.base_url.removesuffix("/v1") + "/health") as resp:
            body = await resp.json()
        async with http.get(s.base_url.removesuffix("/v1") + "/ready") as ready:
            assert ready.status == 200
    assert resp.status == 200
    assert sorted(w["worker_id"] for w in body["workers"]) == sorted(
        w.worker_id for w in s.roles.workers)


async def test_a_long_prompt_fits_on_the_bus_and_one_past_max_payload_is_a_413(stack) -> None:
    s = await stack(workers=1, context_length=2_000_000)

    def body(n: int) -> io.BytesIO:  # a large body goes as a stream (aiohttp asks so)
        prompt = [40000 + i % 9000 for i in range(n)]
        return io.BytesIO(json.dumps({"model": MODEL, "prompt": prompt,
                                      "max_tokens": 2}).encode())

    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        # 200k tokens: ~1.2 MB of JSON, past NATS's default 1 MB message limit
        async with http.post(s.base_url + "/completions", data=body(200_000),
                             headers=headers) as resp:
            answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["usage"]["prompt_tokens"] == 200_000
        # ~9 MB: over the server's max_payload
        async with http.post(s.base_url + "/completions", data=body(1_500_000),
                             headers=headers) as resp:
            err = (await resp.json())["error"]
        assert resp.status == 413 and err["code"] == "request_too_large"
        assert "max_payload" in err["message"]


async def test_health_shows_kv_blocks_per_tier(stack) -> None:
    # A pool of 16 blocks: a second prompt of 10 blocks pushes the first one's blocks
    # down to the host tier, and asking the first again brings them back in from there.
    s = await stack(workers=1, kvbm_host_gib=0.5, num_blocks=16)
    url = s.base_url.removesuffix("/v1")

    async def ask(http: aiohttp.ClientSession, prompt: str) -> None:
        async with http.post(s.base_url + "/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 4}) as resp:
            assert resp.status == 200

    async with aiohttp.ClientSession() as http:
        for prompt in ("tiers " * 80, "other " * 160, "tiers " * 80):  # 10 blocks each
            await ask(http, prompt)
        for _ in range(50):  # the load report follows within a heartbeat
            async with http.get(url + "/health") as resp:
                tiers = (await resp.json())["workers"][0]["kv_tiers"]
            if tiers and tiers["host"].get("onboarded_blocks"):
                break
            await asyncio.sleep(0.1)
    # 0.5 GiB of 16-token blocks at 23,040 bytes a token (the mock's KV size).
    host = tiers["host"]
    assert host["capacity"] == 2**29 // (23040 * 16) and host["blocks"] >= 4
    assert tiers["device"]["capacity"] == 16 and tiers["device"]["blocks"] >= 4
    assert host["stored_blocks"] >= 4 and host["evicted_blocks"] == 0
    assert host["onboarded_blocks"] >= 4  # the first prompt's whole blocks, back in
    assert host["onboarded_bytes"] == host["onboarded_blocks"] * 23040 * 16
    assert host["onboard_seconds"] > 0
