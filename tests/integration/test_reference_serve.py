"""`dynamo-bus serve` with no engine flags serves SmolLM2 on the reference engine: the
`openai` client gets real answers, streamed and not, with logprobs and prefix caching."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import cli_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dynamo-bus serve` as a user starts it, but on a free port and a temp store."""
    store = tmp_path_factory.mktemp("serve") / "js"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_bus.cli", "serve", "--http-port", "0",
         "--store-dir", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env(),
        start_new_session=True)
    assert proc.stdout is not None
    port, log = None, []
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        log.append(line)
        if "frontend serving" in line:
            port = int(line.rsplit(":", 1)[1].split("/")[0])
            break
    if port is None:
        proc.wait(10)
        raise AssertionError("serve never came up:\n" + "".join(log[-30:]))
    # Keep reading its output so a full pipe never blocks it.
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        drain.wait(10)
        proc.stdout.close()
    assert any("reference engine" in line for line in log), "".join(log[-30:])


async def test_a_chat_answer_is_english_and_correct(served: str) -> None:
    async with openai.AsyncOpenAI(base_url=served, api_key="none") as client:
        full = await client.chat.completions.create(model=MODEL, messages=QUESTION,
                                                    max_tokens=32, temperature=0)
        text = full.choices[0].message.content
        assert "Paris" in text, text
        assert full.usage.completion_tokens <= 32
        # Streaming the same greedy request gives the same text, token by token.
        stream = await client.chat.completions.create(model=MODEL, messages=QUESTION,
                                                      max_tokens=32, temperature=0, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == text and len([p for p in parts if p]) > 1


async def test_repeated_prompt_hits_the_prefix_cache(served: str) -> None:
    async with openai.AsyncOpenAI(base_url=served, api_key="none") as client:
        long = [{"role": "system", "content": "You are a concise assistant. " * 12}, *QUESTION]
        first = await client.chat.completions.create(model=MODEL, messages=long, max_tokens=8,
                                                     temperature=0)
        second = await client.chat.completions.create(model=MODEL, messages=long, max_tokens=8,
                                                      temperature=0)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens > 64
        assert cached == 16 * ((first.usage.prompt_tokens - 1) // 16)
        assert second.choices[0].message.content == first.choices[0].message.content


async def test_logprobs_come_from_the_model(served: str) -> None:
    async with openai.AsyncOpenAI(base_url=served, api_key="none") as client:
        out = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6,
                                                   temperature=0, logprobs=True, top_logprobs=2)
        content = out.choices[0].logprobs.content
        assert len(content) >= 1
        for entry in content:
            # Greedy: the chosen token is the most likely one.
            assert entry.top_logprobs[0].token == entry.token
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
            assert entry.logprob <= 0
        assert "".join(e.token for e in content) == out.choices[0].message.content



MOON = [{"role": "user", "content": "用中文写一首关于月亮的短诗。"}]


async def test_an_answer_cut_inside_a_character_ends_before_it(served: str) -> None:
    # max_tokens often ends inside a CJK character's bytes: the text ends before that
    # character (as vLLM's does), streamed and whole alike, never in U+FFFD.
    texts = []
    async with openai.AsyncOpenAI(base_url=served, api_key="none") as client:
        for max_tokens in range(1, 11):
            full = await client.chat.completions.create(model=MODEL, messages=MOON,
                                                        max_tokens=max_tokens, temperature=0)
            text = full.choices[0].message.content or ""
            stream = await client.chat.completions.create(model=MODEL, messages=MOON,
                                                          max_tokens=max_tokens, temperature=0,
                                                          stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "\ufffd" not in text and "".join(parts) == text, (max_tokens, text)
            assert full.usage.completion_tokens == max_tokens
            texts.append(text)
    # Each answer is the start of the next; a token that added no text ended inside a
    # character (it must have happened, or nothing was tested).
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert any(a == b for a, b in itertools.pairwise(texts)), texts


async def test_a_prompt_of_token_ids_ending_inside_a_character(served: str) -> None:
    import tokenizers

    from dynamo_bus.models import resolve_model

    backend = tokenizers.Tokenizer.from_file(str(resolve_model(None).path / "tokenizer.json"))
    ids = backend.encode("我爱北京天安门").ids
    k = next(k for k in range(len(ids) - 1, 0, -1)
             if backend.decode(ids[:k]).endswith("\ufffd"))
    async with openai.AsyncOpenAI(base_url=served, api_key="none") as client:
        out = await client.completions.create(model=MODEL, prompt=ids[:k], max_tokens=6,
                                              temperature=0)
    # The first output token completes the character the prompt began: the answer
    # starts with that character ("门"), not with U+FFFD.
    text = out.choices[0].text
    assert "\ufffd" not in text and text, text
    assert backend.decode(ids[:k]).rstrip("\ufffd") + text[:1] == "我爱北京天安门"
