"""The OpenAI API's shapes: request validation and response bodies.

Validation names the offending field (OpenAI's ``param``) so a client sees exactly
what to fix. Unknown fields are ignored, as OpenAI-compatible servers do, because
clients send fields this server has no use for. Extensions: ``priority``,
``routing_strategy``, ``worker_id``, ``router_config_override``, ``top_k``, ``ignore_eos``,
``stop_token_ids``.

Log-probabilities: chat takes ``logprobs`` (boolean) and ``top_logprobs`` (0..20, only
with ``logprobs``), legacy completions ``logprobs`` (0..20, as vLLM; OpenAI stops at
5). Both become ``SamplingOptions.logprobs`` = k, the number of alternatives per token.
Which tokens get an entry, and where, is the service's rule (``dynamo_bus.serving.service``);
this module only shapes the entries it is given (:class:`TokenLogprob`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from dynamo_bus.bus.messages import (
    ROUTING_STRATEGIES,
    KvRouterOverride,
    RoutingHints,
    SamplingOptions,
    Usage,
)
from dynamo_bus.errors import InvalidRequest

Kind = Literal["chat", "completion"]
_MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
# JSON has no -inf: a token the model rules out is reported as OpenAI and vLLM do.
_MIN_LOGPROB = -9999.0


class ParsedRequest(msgspec.Struct):
    kind: Kind
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None       # None: up to the context length
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    stop: list[str] = []
    stream: bool = False
    include_usage: bool = False
    priority: int = 0
    routing: RoutingHints = msgspec.field(default_factory=RoutingHints)


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float,
            *, integer: bool = False, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        raise _bad(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise _bad(key, f"must be in {bracket}{lo}, {hi}], got {value}")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty array of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _bad(f"messages[{i}].content", "only text content parts are supported")
                texts.append(str(part.get("text", "")))
            m = {**m, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or an array of text parts")
        out.append(m)
    return out


def _prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return None, prompt
    raise _bad("prompt", "must be a string or an array of token ids (one prompt per request)")


def _logprobs(body: dict[str, Any], kind: Kind) -> int | None:
    """``SamplingOptions.logprobs`` for the request: None (not asked) or k >= 0."""
    if kind == "completion":  # legacy: an integer, the number of alternatives
        if body.get("logprobs") is None:
            return None
        return int(_number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True))
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad("logprobs", f"must be a boolean, got {wanted!r}")
    if body.get("top_logprobs") is None:
        return 0 if wanted else None
    top = int(_number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True))
    if not wanted:
        raise InvalidRequest("The 'top_logprobs' parameter is only allowed when 'logprobs' "
                             "is true.", param="top_logprobs")
    return top


def parse_request(body: Any, kind: Kind) -> ParsedRequest:
    """Validate an OpenAI request body. Raises ``InvalidRequest`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required and must be a string")
    parsed = ParsedRequest(kind=kind, model=model)
    if kind == "chat":
        parsed.messages = _messages(body)
    else:
        parsed.prompt, parsed.prompt_token_ids = _prompt(body)
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            parsed.max_tokens = int(_number(body, key, 0, 1, 2**31, integer=True))
            break
    if body.get("n", 1) not in (1, None):
        raise _bad("n", f"only n=1 is supported, got {body['n']!r}")
    _parse_sampling(body, kind, parsed.sampling)
    parsed.stop = _stop(body)
    parsed.stream, parsed.include_usage = _stream(body)
    parsed.priority = int(_number(body, "priority", 0, -(2**31), 2**31, integer=True))
    _parse_routing(body, parsed.routing)
    return parsed


def _parse_sampling(body: dict[str, Any], kind: Kind, s: SamplingOptions) -> None:
    s.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    s.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    s.top_k = int(_number(body, "top_k", -1, -1, 2**31, integer=True))
    s.logprobs = _logprobs(body, kind)
    seed = body.get("seed")
    if seed is not None:
        s.seed = int(_number(body, "seed", 0, -(2**63), 2**64 - 1, integer=True))
    if "ignore_eos" in body:
        if not isinstance(body["ignore_eos"], bool):
            raise _bad("ignore_eos", "must be a boolean")
        s.ignore_eos = body["ignore_eos"]
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
            raise _bad("stop_token_ids", "must be an array of integers")
        s.stop_token_ids = list(stop_ids)


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise _bad("stop", "must be a non-empty string or an array of them")
    if len(stop) > _MAX_STOP:
        raise _bad("stop", f"at most {_MAX_STOP} stop sequences")
    return stop


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    return stream, bool(opts.get("include_usage", False))


def _parse_routing(body: dict[str, Any], routing: RoutingHints) -> None:
    strategy = body.get("routing_strategy")
    if strategy is not None:
        if strategy not in ROUTING_STRATEGIES:
            raise _bad("routing_strategy", f"must be one of {', '.join(ROUTING_STRATEGIES)}")
        routing.strategy = strategy
    worker_id = body.get("worker_id")
    if worker_id is not None:
        if not isinstance(worker_id, str):
            raise _bad("worker_id", "must be a string")
        routing.worker_id = worker_id
    override = body.get("router_config_override")
    if override is not None:
        routing.kv = _router_override(override)


# Extension ``router_config_override``: the KV-aware cost's weights for one request.
_OVERRIDE_KEYS = {"overlap_weight": "overlap_weight", "overlap_score_weight": "overlap_weight",
                  "temperature": "temperature", "router_temperature": "temperature",
                  "device_credit": "device_credit", "host_credit": "host_credit",
                  "disk_credit": "disk_credit"}


def _router_override(value: Any) -> KvRouterOverride:
    param = "router_config_override"
    if not isinstance(value, dict):
        raise _bad(param, "must be an object")
    unknown = set(value) - set(_OVERRIDE_KEYS)
    if unknown:
        raise _bad(param, f"unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}")
    named = {f"{param}.{key}": v for key, v in value.items()}  # errors name the inner field
    return KvRouterOverride(**{_OVERRIDE_KEYS[key]: _number(named, f"{param}.{key}", 0.0, 0.0,
                                                             1e6) for key in value})


# -- responses -------------------------------------------------------------------------

class TokenLogprob(msgspec.Struct):
    """One generated token's entry: its id, log-probability, the k most likely
    ``(id, log-probability)`` pairs, and where its text starts in the choice's text
    (characters, counted from the start of the completion over the whole stream)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    offset: int


# A token id's text decoded on its own, and its bytes (``Tokenizer.token_piece``).
Pieces = Callable[[int], tuple[str, bytes]]


def _lp(value: float | None) -> float | None:
    return None if value is None else max(value, _MIN_LOGPROB)


def chat_logprobs_body(entries: list[TokenLogprob], piece: Pieces) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one chunk of its stream)."""
    content = []
    for e in entries:
        text, raw = piece(e.token_id)
        top = []
        for tid, lp in e.top:
            t, b = piece(tid)
            top.append({"token": t, "logprob": _lp(lp), "bytes": list(b)})
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": list(raw),
                        "top_logprobs": top})
    return {"content": content}


def completion_logprobs_body(entries: list[TokenLogprob], piece: Pieces) -> dict[str, Any]:
    """``choices[].logprobs`` of a legacy completion (or of one chunk of its stream).
    ``text_offset`` indexes the completion's text; ``top_logprobs`` maps token text to
    log-probability, so two alternatives with the same text keep the likelier one."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(piece(e.token_id)[0])
        token_logprobs.append(_lp(e.logprob))
        top: dict[str, float | None] = {}
        for tid, lp in e.top:
            top.setdefault(piece(tid)[0], _lp(lp))
        tops.append(top)
        offsets.append(e.offset)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def logprobs_body(kind: Kind, entries: list[TokenLogprob], piece: Pieces) -> dict[str, Any]:
    return (chat_logprobs_body if kind == "chat" else completion_logprobs_body)(entries, piece)


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def chunk_body(kind: Kind, rid: str, model: str, created: int, text: str | None,
               finish_reason: str | None, *, first: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk; ``text=None`` with ``first`` gives the role-only opener.
    ``logprobs`` is the chunk's ``logprobs_body`` (None: not asked for)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk_body(kind: Kind, rid: str, model: str, created: int,
                     usage: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}


def full_body(kind: Kind, rid: str, model: str, created: int, text: str,
              finish_reason: str, usage: Usage,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage_body(usage)}


def model_list_body(models: list[str], created: int | None = None) -> dict[str, Any]:
    created = created or int(time.time())
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "dynamo-bus"}
        for m in models]}
