"""Request validation, the stop-string matcher, and logprobs: fields, bodies, and
which tokens get entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dynamo_bus.bus.messages import Chunk, Request, Usage
from dynamo_bus.errors import InvalidRequest
from dynamo_bus.models.modeldir import ModelDir
from dynamo_bus.models.tokenizer import Tokenizer
from dynamo_bus.serving.openai_api import (
    Kind,
    ParsedRequest,
    TokenLogprob,
    chat_logprobs_body,
    chunk_body,
    completion_logprobs_body,
    full_body,
    parse_request,
)
from dynamo_bus.serving.service import CompletionService, StopMatcher

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_defaults_and_extensions() -> None:
    p = parse_request({**CHAT, "max_tokens": 5, "seed": 1, "stop": "x", "priority": 2,
                       "routing_strategy": "least_loaded", "stream": True,
                       "stream_options": {"include_usage": True}, "unknown": 1}, "chat")
    assert (p.max_tokens, p.sampling.seed, p.stop, p.priority) == (5, 1, ["x"], 2)
    assert p.routing.strategy == "least_loaded" and p.include_usage
    p = parse_request({**CHAT, "routing_strategy": "kv_aware", "router_config_override": {
        "overlap_score_weight": 2.0, "router_temperature": 0.5, "host_credit": 0.5}}, "chat")
    kv = p.routing.kv
    assert kv is not None and (kv.overlap_weight, kv.temperature, kv.host_credit,
                               kv.device_credit) == (2.0, 0.5, 0.5, None)


def test_content_parts_are_joined() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert parse_request(body, "chat").messages[0]["content"] == "ab"


@pytest.mark.parametrize(("patch", "param"), [
    ({"model": None}, "model"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"seed": 1.5}, "seed"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"stop": [""]}, "stop"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"router_config_override": {"router_temperature": -1}},
     "router_config_override.router_temperature"),
    ({"router_config_override": {"psychic": 1}}, "router_config_override"),
])
def test_errors_name_the_field(patch, param) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_request({**CHAT, **patch}, "chat")
    assert exc.value.param == param and exc.value.status == 400


def test_completion_prompt_forms() -> None:
    assert parse_request({"model": "m", "prompt": "hi"}, "completion").prompt == "hi"
    assert parse_request({"model": "m", "prompt": [3, 4]}, "completion").prompt_token_ids == [3, 4]
    assert parse_request({"model": "m", "prompt": ["hi"]}, "completion").prompt == "hi"
    with pytest.raises(InvalidRequest, match="prompt"):
        parse_request({"model": "m", "prompt": ["a", "b"]}, "completion")


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m, text = StopMatcher(stops), ""
    for piece in pieces:
        out, hit = m.push(piece)
        text += out
        if hit:
            return text, True
    return text + m.flush(), False


def test_stop_string_split_across_pieces_is_found() -> None:
    assert _run(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert _run(["b", "xyz"], ["a xyz b"]) == ("a ", True)


def test_a_false_alarm_is_released_unchanged() -> None:
    assert _run(["END"], ["an E", "ND", "ING"]) == ("an ", True)
    assert _run(["END"], ["an E", "NJOY", "ING"]) == ("an ENJOYING", False)
    assert _run([], ["as ", "is"]) == ("as is", False)


# -- logprobs: request fields ------------------------------------------------------------

PROMPT = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(("body", "kind", "k"), [
    (CHAT, "chat", None),
    ({**CHAT, "logprobs": False}, "chat", None),
    ({**CHAT, "logprobs": None, "top_logprobs": None}, "chat", None),
    ({**CHAT, "logprobs": True}, "chat", 0),
    ({**CHAT, "logprobs": True, "top_logprobs": 0}, "chat", 0),
    ({**CHAT, "logprobs": True, "top_logprobs": 20}, "chat", 20),
    (PROMPT, "completion", None),
    ({**PROMPT, "logprobs": None}, "completion", None),
    ({**PROMPT, "logprobs": 0}, "completion", 0),
    ({**PROMPT, "logprobs": 5}, "completion", 5),
    ({**PROMPT, "logprobs": 20}, "completion", 20),
])
def test_logprobs_fields_become_the_number_of_alternatives(body, kind, k) -> None:
    assert parse_request(body, kind).sampling.logprobs == k


@pytest.mark.parametrize(("body", "kind", "param", "says"), [
    ({**CHAT, "logprobs": "yes"}, "chat", "logprobs", "must be a boolean"),
    ({**CHAT, "logprobs": 3}, "chat", "logprobs", "must be a boolean"),  # the legacy form
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "chat", "top_logprobs", "[0, 20]"),
    ({**CHAT, "logprobs": True, "top_logprobs": -1}, "chat", "top_logprobs", "[0, 20]"),
    ({**CHAT, "logprobs": True, "top_logprobs": 2.5}, "chat", "top_logprobs", "integer"),
    ({**CHAT, "logprobs": True, "top_logprobs": True}, "chat", "top_logprobs", "integer"),
    ({**CHAT, "top_logprobs": 3}, "chat", "top_logprobs", "only allowed when 'logprobs'"),
    ({**CHAT, "logprobs": False, "top_logprobs": 0}, "chat", "top_logprobs",
     "only allowed when 'logprobs'"),
    ({**PROMPT, "logprobs": True}, "completion", "logprobs", "integer"),
    ({**PROMPT, "logprobs": "5"}, "completion", "logprobs", "integer"),
    ({**PROMPT, "logprobs": 21}, "completion", "logprobs", "[0, 20]"),
    ({**PROMPT, "logprobs": -1}, "completion", "logprobs", "[0, 20]"),
])
def test_bad_logprobs_fields_are_400s_naming_the_field(body, kind, param, says) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_request(body, kind)
    assert (exc.value.param, exc.value.status) == (param, 400)
    assert says in exc.value.message and param in exc.value.message
    assert exc.value.to_openai()["error"]["param"] == param


# -- logprobs: response bodies -----------------------------------------------------------

# id: (text decoded on its own, bytes); 11 and 12 are the halves of one 4-byte character.
PIECES = {10: ("Hi", b"Hi"), 11: (" \ufffd", b" \xf0\x9f"), 12: ("\ufffd", b"\x98\x80"),
          13: ("hi", b"hi"), 14: ("Hi", b"Hi")}


def test_chat_logprobs_body_has_openais_shape() -> None:
    entries = [TokenLogprob(10, -0.25, [(10, -0.25), (13, -1.5)], 0),
               TokenLogprob(11, float("-inf"), [], 2)]
    assert chat_logprobs_body(entries, PIECES.__getitem__) == {"content": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "hi", "logprob": -1.5, "bytes": [104, 105]}]},
        # JSON has no -inf; a split character shows U+FFFD but its own raw bytes.
        {"token": " \ufffd", "logprob": -9999.0, "bytes": [32, 0xF0, 0x9F],
         "top_logprobs": []}]}


def test_completion_logprobs_body_has_openais_shape() -> None:
    entries = [TokenLogprob(10, -0.25, [(10, -0.25), (14, -0.5), (13, -1.5)], 0),
               TokenLogprob(11, -1.0, [(11, -1.0)], 2), TokenLogprob(12, -2.0, [], 3)]
    assert completion_logprobs_body(entries, PIECES.__getitem__) == {
        "tokens": ["Hi", " \ufffd", "\ufffd"],
        "token_logprobs": [-0.25, -1.0, -2.0],
        # keyed by text: of two alternatives that read "Hi" the likelier stays
        "top_logprobs": [{"Hi": -0.25, "hi": -1.5}, {" \ufffd": -1.0}, {}],
        "text_offset": [0, 2, 3]}


def test_bodies_validate_as_the_openai_sdks_models() -> None:
    entries = [TokenLogprob(10, -0.25, [(10, -0.25), (13, -1.5)], 0)]
    chat_lp = chat_logprobs_body(entries, PIECES.__getitem__)
    full = ChatCompletion.model_validate(
        full_body("chat", "c", "m", 1, "Hi", "length", Usage(3, 1), logprobs=chat_lp))
    assert full.choices[0].logprobs.content[0].top_logprobs[1].token == "hi"
    chunk = ChatCompletionChunk.model_validate(
        chunk_body("chat", "c", "m", 1, "Hi", None, first=True, logprobs=chat_lp))
    assert chunk.choices[0].logprobs.content[0].bytes == [72, 105]
    cmpl_lp = completion_logprobs_body(entries, PIECES.__getitem__)
    cmpl = Completion.model_validate(
        full_body("completion", "c", "m", 1, "Hi", "length", Usage(3, 1), logprobs=cmpl_lp))
    assert cmpl.choices[0].logprobs.top_logprobs == [{"Hi": -0.25, "hi": -1.5}]
    # Not asked for: null, as before.
    assert full_body("chat", "c", "m", 1, "", "stop", Usage())["choices"][0]["logprobs"] is None
    assert chunk_body("completion", "c", "m", 1, "", None)["choices"][0]["logprobs"] is None


# -- logprobs: which tokens get entries (the service's rule) -----------------------------

EOS = 2
EMOJI = [88, 2756, 31394, 40303, 218, 905]  # "héllo 😀 world"; 40303+218 split the emoji


class FakeStream:
    """What ``CompletionService.events`` reads from a ``TokenStream``."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.request = Request(request_id="r", model="m", token_ids=[1, 2, 3], reply_to="")
        self.request_id = "r"
        self.chunks = chunks
        self.cancelled: list[str] = []

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Chunk]:
        for chunk in self.chunks:
            yield chunk

    async def cancel(self, reason: str = "client disconnected") -> None:
        self.cancelled.append(reason)


def _chunks(ids: list[int], sizes: list[int], finish: str = "length",
            with_logprobs: bool = True) -> list[Chunk]:
    """``ids`` cut into chunks of ``sizes``; token i has logprob -i/10 and itself plus
    token 0 as its two alternatives."""
    out, start = [], 0
    for n in sizes:
        part = ids[start:start + n]
        lps = [-(start + j) / 10 for j in range(len(part))]
        tops = [[(t, lp), (0, lp - 5)] for t, lp in zip(part, lps, strict=True)]
        out.append(Chunk(request_id="r", index=start, token_ids=part,
                         logprobs=lps if with_logprobs else None,
                         top_logprobs=tops if with_logprobs else None))
        start += n
    assert start == len(ids)
    out[-1].finish_reason = finish
    out[-1].usage = Usage(prompt_tokens=3, completion_tokens=len(ids))
    return out


@pytest.fixture(scope="module")
def service(model_dir: ModelDir) -> CompletionService:
    return CompletionService(None, model_dir, Tokenizer.from_dir(model_dir.path))  # type: ignore[arg-type]


def _parsed(kind: Kind, k: int | None, stop: list[str] | None = None,
            stream: bool = False) -> ParsedRequest:
    body: dict[str, Any] = {**(CHAT if kind == "chat" else PROMPT), "stream": stream}
    if stop:
        body["stop"] = stop
    if k is not None:
        body.update({"logprobs": True, "top_logprobs": k} if kind == "chat" else {"logprobs": k})
    p = parse_request(body, kind)
    p.sampling.stop_token_ids = [EOS]  # as prepare() adds the model's EOS
    return p


def _unary(service: CompletionService, p: ParsedRequest, chunks: list[Chunk]) -> dict:
    return asyncio.run(service.complete(p, FakeStream(chunks)))  # type: ignore[arg-type]


def _streamed(service: CompletionService, p: ParsedRequest, chunks: list[Chunk]) -> list[dict]:
    async def collect() -> list[dict]:
        return [c async for c in service.stream_chunks(p, FakeStream(chunks))]  # type: ignore[arg-type]
    return asyncio.run(collect())


def test_every_token_has_an_entry_whose_offset_indexes_the_text(service) -> None:
    body = _unary(service, _parsed("completion", 2), _chunks(EMOJI, [6]))
    choice = body["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text == "héllo 😀 world"
    assert body["usage"]["completion_tokens"] == len(lp["tokens"]) == 6
    assert lp["tokens"] == ["h", "é", "llo", " \ufffd", "\ufffd", " world"]
    assert lp["token_logprobs"] == [0.0, -0.1, -0.2, -0.3, -0.4, -0.5]
    # The emoji's first token carries the space; the second completes the character.
    assert lp["text_offset"] == [0, 1, 2, 5, 6, 7]
    assert [len(top) for top in lp["top_logprobs"]] == [2] * 6
    assert lp["top_logprobs"][0] == {"h": 0.0, "<|endoftext|>": -5.0}


def test_chat_entries_carry_raw_bytes_of_a_split_character(service) -> None:
    body = _unary(service, _parsed("chat", 1), _chunks(EMOJI, [2, 4]))
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["h", "é", "llo", " \ufffd", "\ufffd", " world"]
    assert bytes(content[3]["bytes"] + content[4]["bytes"]).decode() == " 😀"
    assert [len(c["top_logprobs"]) for c in content] == [2] * 6  # as the engine gave them
    assert content[1]["top_logprobs"][0] == {"token": "é", "logprob": -0.1,
                                             "bytes": list("é".encode())}


def test_a_stripped_stop_token_gets_no_entry(service) -> None:
    ids = [*EMOJI, EOS]
    body = _unary(service, _parsed("completion", 0), _chunks(ids, [3, 4], finish="stop"))
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("héllo 😀 world", "stop")
    assert len(choice["logprobs"]["tokens"]) == 6  # the EOS is counted, not shown
    assert body["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize(("stop", "text", "kept"), [
    ("lo", "hél", 3),       # cut inside "llo": the token whose text starts before stays
    ("😀", "héllo ", 4),    # the emoji's first token starts before it (with the space)
    (" world", "héllo 😀", 5),
])
def test_a_stop_string_keeps_the_entries_of_tokens_that_start_before_it(
        service, stop, text, kept) -> None:
    body = _unary(service, _parsed("completion", 1, stop=[stop]), _chunks(EMOJI, [1] * 6))
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, "stop")
    assert choice["logprobs"]["tokens"] == ["h", "é", "llo", " \ufffd", "\ufffd",
                                            " world"][:kept]


@pytest.mark.parametrize("stop", [None, "lo", "😀", " world"])
@pytest.mark.parametrize("sizes", [[6], [1] * 6, [2, 3, 1], [4, 2]])
def test_streamed_entries_add_up_to_the_unary_ones_and_follow_their_text(
        service, stop, sizes) -> None:
    stops = [stop] if stop else None
    unary = _unary(service, _parsed("completion", 1, stops), _chunks(EMOJI, [6]))
    events = _streamed(service, _parsed("completion", 1, stops, stream=True),
                       _chunks(EMOJI, sizes))
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                        "text_offset": []}
    for event in events:
        choice = event["choices"][0]
        for key, values in choice["logprobs"].items():
            merged[key] += values
        # Each chunk carries the entries of the tokens whose text starts in it (the
        # last one also any that add no text of their own).
        for offset in choice["logprobs"]["text_offset"]:
            assert len(text) <= offset < len(text) + len(choice["text"]) or (
                choice["finish_reason"] and offset == len(text) + len(choice["text"]))
        text += choice["text"]
    assert text == unary["choices"][0]["text"]
    assert merged == unary["choices"][0]["logprobs"]


def test_no_logprobs_unless_asked(service) -> None:
    chunks = _chunks(EMOJI, [2, 4], with_logprobs=False)
    assert _unary(service, _parsed("chat", None), chunks)["choices"][0]["logprobs"] is None
    events = _streamed(service, _parsed("completion", None, stream=True),
                       _chunks(EMOJI, [2, 4], with_logprobs=False))
    assert events and all(e["choices"][0]["logprobs"] is None for e in events)
