"""Log-probabilities as an OpenAI client sees them, through the real HTTP frontend and
the whole bus: one entry per completion token, the number of alternatives asked for,
the same entries streamed or not, and nothing when not asked."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from dynamo_bus.models.modeldir import ModelDir
from dynamo_bus.models.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Say hello."}]
PROMPT = "Once upon a time"
N = 24  # tokens per answer: enough for split characters and special tokens to show up


@pytest.fixture(scope="module")
def special_tokens(model_dir: ModelDir) -> set[str]:
    """Texts of the special tokens: they have entries but no text in the answer."""
    backend = Tokenizer.from_dir(model_dir.path).backend
    return {t.content for t in backend.get_added_tokens_decoder().values()}


def _spelled(tokens: list[str], raw: list[list[int]], special: set[str]) -> str:
    """The text the entries spell out, as the detokenizer writes it."""
    data = b"".join(bytes(b) for t, b in zip(tokens, raw, strict=True) if t not in special)
    return data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("k", [0, 5])
async def test_chat_has_one_entry_per_token_streamed_or_not(stack, special_tokens, k) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    args = dict(model=MODEL, messages=CHAT, max_tokens=N, seed=5, logprobs=True,
                top_logprobs=k)
    full = await client.chat.completions.create(**args)
    choice = full.choices[0]
    content = choice.logprobs.content
    assert len(content) == full.usage.completion_tokens == N
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0
        assert len(entry.top_logprobs) == k
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)  # most likely first
        assert all(t.bytes is not None for t in entry.top_logprobs)
    # The entries' bytes spell the answer (split characters join up again).
    assert _spelled([e.token for e in content], [e.bytes for e in content],
                    special_tokens) == choice.message.content

    stream = await client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True})
    streamed, text, usage = [], "", None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            assert c.logprobs is not None  # asked for: every chunk has the object
            streamed += c.logprobs.content
    assert text == choice.message.content
    assert usage is not None and len(streamed) == usage.completion_tokens == N
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    await client.close()


@pytest.mark.parametrize("k", [0, 3])
async def test_completions_have_one_entry_per_token_streamed_or_not(stack, k) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=N, seed=9, logprobs=k)
    full = await client.completions.create(**args)
    text, lp = full.choices[0].text, full.choices[0].logprobs
    assert full.usage.completion_tokens == N
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N
    assert len(lp.text_offset) == N
    # Alternatives are keyed by their text; alternatives that both show only U+FFFD
    # (bytes of a split character) would share a key.
    assert all(len(top) == k or "\ufffd" in top for top in lp.top_logprobs)
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs)
    # text_offset indexes the returned text: each token's text is found where it says.
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if "\ufffd" not in token and not token.startswith("<"):
            assert text[offset:offset + len(token)] == token

    stream = await client.completions.create(**args, stream=True)
    streamed: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    streamed_text = ""
    async for chunk in stream:
        for c in chunk.choices:
            # Each chunk carries the entries of the tokens whose text starts in it.
            for offset in c.logprobs.text_offset:
                assert len(streamed_text) <= offset <= len(streamed_text) + len(c.text)
            streamed_text += c.text
            for key, values in streamed.items():
                values += getattr(c.logprobs, key)
    assert streamed_text == text
    assert streamed == {key: getattr(lp, key) for key in streamed}
    await client.close()


async def test_a_stop_string_keeps_the_entries_of_the_text_it_leaves(stack) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    args = dict(model=MODEL, prompt="abc", max_tokens=40, seed=11, logprobs=1)
    full = await client.completions.create(**args)
    text, lp = full.choices[0].text, full.choices[0].logprobs
    stop = text[10:14]
    cut = await client.completions.create(**args, stop=[stop])
    cut_text, cut_lp = cut.choices[0].text, cut.choices[0].logprobs
    assert cut_text == text[:text.index(stop)]
    # Exactly the tokens whose text starts before the stop string keep their entries.
    kept = sum(offset < len(cut_text) for offset in lp.text_offset)
    assert 0 < kept < len(lp.tokens)
    assert cut_lp.tokens == lp.tokens[:kept]
    assert cut_lp.token_logprobs == lp.token_logprobs[:kept]
    assert cut_lp.text_offset == lp.text_offset[:kept]
    await client.close()


async def test_no_logprobs_unless_asked(stack) -> None:
    s = await stack(workers=1)
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none")
    for extra in ({}, {"logprobs": False}):
        full = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                    **extra)
        assert full.choices[0].logprobs is None
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT,
                                                      max_tokens=8, stream=True, **extra)
        chunks = [c async for c in stream if c.choices]
        assert chunks and all(c.choices[0].logprobs is None for c in chunks)
    full_c = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8)
    assert full_c.choices[0].logprobs is None
    stream_c = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                               stream=True)
    chunks = [c async for c in stream_c if c.choices]
    assert chunks and all(c.choices[0].logprobs is None for c in chunks)
    await client.close()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/chat/completions", {"messages": CHAT, "logprobs": 2}, "logprobs"),
    ("/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ("/completions", {"prompt": PROMPT, "logprobs": True}, "logprobs"),
])
async def test_bad_logprobs_fields_are_named(stack, path, body, param) -> None:
    s = await stack(workers=1)
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + path, json={"model": MODEL, **body}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == 400
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"]
