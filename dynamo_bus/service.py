"""OpenAI completions over the bus, without HTTP: tokenize, submit, detokenize.

The HTTP frontend serves this over aiohttp; ``DynamoClient`` runs it in-process
against ``nats://``; both therefore give the same answers and raise the same errors.
Stop strings are matched here, on text: the worker sees token ids only, and is told
to stop (cancel) when a stop string ends the text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from dynamo_bus.errors import (
    DynamoBusError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
)
from dynamo_bus.messages import Request, Usage
from dynamo_bus.modeldir import ModelDir
from dynamo_bus.openai_api import ParsedRequest, chunk_body, full_body, usage_chunk_body
from dynamo_bus.requester import Requester, TokenStream, new_request_id
from dynamo_bus.tokenizer import IncrementalDetokenizer, Tokenizer


class StopMatcher:
    """Finds the first stop string in streamed text. Text that might be the start of a
    stop string is held back until the next piece shows whether it is."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[:min(hits)], True
        cut = max(len(buf) - self._hold, 0)
        self._pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class CompletionService:
    def __init__(self, requester: Requester, model_dir: ModelDir, tokenizer: Tokenizer,
                 *, served_name: str | None = None) -> None:
        self.requester = requester
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.model = served_name or model_dir.name

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise ModelNotFound(f"model {model!r} does not exist; this server serves "
                                f"{self.model!r}", param="model")

    def _tokenize(self, p: ParsedRequest) -> list[int]:
        if p.kind == "chat":
            assert p.messages is not None
            try:
                text = self.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True)
            except Exception as exc:  # a template's raise_exception, or bad roles
                raise InvalidRequest(f"messages: {exc}", param="messages") from exc
            return self.tokenizer.encode(text)
        if p.prompt_token_ids is not None:
            if max(p.prompt_token_ids) >= self.model_dir.vocab_size:
                raise InvalidRequest("prompt: token id out of the vocabulary", param="prompt")
            return p.prompt_token_ids
        assert p.prompt is not None
        return self.tokenizer.encode(p.prompt)

    async def prepare(self, p: ParsedRequest) -> Request:
        """Tokenize (off the event loop) and check lengths."""
        self.check_model(p.model)
        token_ids = await asyncio.to_thread(self._tokenize, p)
        ctx = self.model_dir.context_length
        if not token_ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        if len(token_ids) >= ctx:
            raise PromptTooLong(f"prompt is {len(token_ids)} tokens; this model's context is "
                                f"{ctx} tokens", param="messages" if p.kind == "chat"
                                else "prompt")
        max_tokens = p.max_tokens if p.max_tokens is not None else ctx - len(token_ids)
        if len(token_ids) + max_tokens > ctx:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(token_ids)}) + max_tokens ({max_tokens}) exceeds "
                f"the context length ({ctx})", param="max_tokens", code="context_length_exceeded")
        sampling = p.sampling
        sampling.max_tokens = max_tokens
        if not sampling.ignore_eos:
            sampling.stop_token_ids = sorted(set(sampling.stop_token_ids)
                                             | set(self.model_dir.eos_token_ids))
        # A unary request without stop strings needs no token until the end.
        return Request(request_id=new_request_id(), model=self.model, token_ids=token_ids,
                       reply_to="", sampling=sampling, routing=p.routing, priority=p.priority,
                       stream=p.stream or bool(p.stop))

    async def submit(self, p: ParsedRequest) -> TokenStream:
        return await self.requester.submit(await self.prepare(p))

    async def events(self, p: ParsedRequest, stream: TokenStream
                     ) -> AsyncIterator[tuple[str, str | None, Usage | None]]:
        """(text delta, finish_reason, usage) per chunk; cancels the request on exit
        unless it finished (client gone, stop string, error)."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(p.stop)
        eos = set(p.sampling.stop_token_ids)
        usage = Usage(prompt_tokens=len(stream.request.token_ids))
        try:
            async for chunk in stream:
                ids = chunk.token_ids
                if chunk.finish_reason == "stop" and ids and ids[-1] in eos:
                    ids = ids[:-1]  # the stop token is not part of the text
                text, hit = stops.push(detok.push(ids))
                if chunk.usage is not None:
                    usage = chunk.usage
                else:
                    usage.completion_tokens = chunk.index + len(chunk.token_ids)
                if hit:
                    await stream.cancel("stop string")
                    yield text, "stop", usage
                    return
                if chunk.finish_reason in ("cancelled", "error"):
                    # Not an OpenAI finish reason: the request did not complete.
                    raise (Overloaded("the request was cancelled by the server")
                           if chunk.finish_reason == "cancelled"
                           else DynamoBusError("the engine failed on this request"))
                if chunk.finish_reason is not None:
                    text += stops.push(detok.flush())[0] + stops.flush()
                    yield text, chunk.finish_reason, usage
                    return
                if text:
                    yield text, None, None
        finally:
            await stream.cancel()

    async def stream_chunks(self, p: ParsedRequest, stream: TokenStream
                            ) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI ``chat.completion.chunk`` / ``text_completion`` bodies."""
        rid = ("chatcmpl-" if p.kind == "chat" else "cmpl-") + stream.request_id
        created = int(time.time())
        first = True
        # The role comes with the first text, not before it: so nothing is sent until
        # the request has reached a worker, and an early error keeps its HTTP status.
        async for text, reason, usage in self.events(p, stream):
            yield chunk_body(p.kind, rid, self.model, created, text, reason, first=first)
            first = False
            if reason is not None and usage is not None and p.include_usage:
                yield usage_chunk_body(p.kind, rid, self.model, created, usage)

    async def complete(self, p: ParsedRequest, stream: TokenStream) -> dict[str, Any]:
        rid = ("chatcmpl-" if p.kind == "chat" else "cmpl-") + stream.request_id
        parts: list[str] = []
        reason, usage = "stop", Usage()
        async for text, r, u in self.events(p, stream):
            parts.append(text)
            if r is not None:
                reason, usage = r, u or usage
        return full_body(p.kind, rid, self.model, int(time.time()), "".join(parts), reason, usage)
