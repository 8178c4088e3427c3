"""Request validation and the stop-string matcher."""

from __future__ import annotations

import pytest

from dynamo_bus.errors import InvalidRequest
from dynamo_bus.openai_api import parse_request
from dynamo_bus.service import StopMatcher

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_defaults_and_extensions() -> None:
    p = parse_request({**CHAT, "max_tokens": 5, "seed": 1, "stop": "x", "priority": 2,
                       "routing_strategy": "least_loaded", "stream": True,
                       "stream_options": {"include_usage": True}, "unknown": 1}, "chat")
    assert (p.max_tokens, p.sampling.seed, p.stop, p.priority) == (5, 1, ["x"], 2)
    assert p.routing.strategy == "least_loaded" and p.include_usage


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
