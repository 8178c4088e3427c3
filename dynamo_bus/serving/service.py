"""OpenAI completions over the bus, without HTTP: tokenize, submit, detokenize.

The HTTP frontend serves this over aiohttp; ``DynamoClient`` runs it in-process
against ``nats://``; both therefore give the same answers and raise the same errors.
Stop strings are matched here, on text: the worker sees token ids only, and is told
to stop (cancel) when a stop string ends the text.

Log-probabilities (``logprobs``) follow the text the client gets: a generated token
has an entry exactly when its text is part of the response (see :class:`LogprobTracker`
for the rule), and in a stream each chunk carries the entries of the tokens whose text
starts in that chunk's text.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, NamedTuple

from dynamo_bus.bus.messages import Request, Usage
from dynamo_bus.errors import (
    DynamoBusError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
)
from dynamo_bus.models.modeldir import ModelDir
from dynamo_bus.models.tokenizer import IncrementalDetokenizer, Tokenizer
from dynamo_bus.serving.openai_api import (
    ParsedRequest,
    TokenLogprob,
    chunk_body,
    full_body,
    logprobs_body,
    usage_chunk_body,
)
from dynamo_bus.serving.requester import Requester, new_request_id
from dynamo_bus.serving.stream import TokenStream


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


class LogprobTracker:
    """Lines up the logprobs of generated tokens with the text the client is given.

    The rule: a generated token gets a logprobs entry exactly when its text is part of
    the response, placed where that text starts (``TokenLogprob.offset``, characters
    into the completion). Hence:

    * a stop token id that ends the output (EOS, or one of ``stop_token_ids``) is
      stripped from the text and gets no entry; it still counts in
      ``usage.completion_tokens``, as it was generated;
    * when a stop string is matched, tokens whose text starts before the stop string
      keep their entry (also the one the stop string begins inside of); the tokens from
      where it begins on get none, though generated and counted in usage;
    * a token with no text of its own (a special token that decodes to nothing, the
      leading bytes of a character split across tokens) sits where the next text
      starts: it is kept when that text is, and kept at the end of a response that was
      not cut by a stop string.

    So without a stop string or stripped stop token, there is one entry per
    completion token. In a stream, an entry goes out with the chunk whose text reaches
    past its offset (text held back as a possible stop string or an incomplete
    character holds its tokens' entries back with it); the last chunk carries what is
    left. The entries of all chunks together equal the unary response's.

    Text comes from the request's ``IncrementalDetokenizer`` fed one token at a time,
    so offsets count the same characters the client receives however the tokens were
    chunked.
    """

    def __init__(self, detok: IncrementalDetokenizer) -> None:
        self._detok = detok
        self._queue: deque[TokenLogprob] = deque()
        self._end = 0  # characters the detokenizer has produced so far

    def push(self, ids: Sequence[int], logprobs: Sequence[float] | None,
             top: Sequence[Sequence[tuple[int, float]]] | None) -> str:
        """Detokenize ``ids`` (with their logprobs, same order) and queue their entries;
        returns the new text."""
        pieces = []
        for j, tid in enumerate(ids):
            lp = logprobs[j] if logprobs is not None and j < len(logprobs) else None
            alts = list(top[j]) if top is not None and j < len(top) else []
            self._queue.append(TokenLogprob(tid, lp, alts, self._end))
            piece = self._detok.push([tid])
            self._end += len(piece)
            pieces.append(piece)
        return "".join(pieces)

    def flush(self) -> str:
        text = self._detok.flush()
        self._end += len(text)
        return text

    def take(self, emitted: int) -> list[TokenLogprob]:
        """The queued entries whose text starts before character ``emitted``."""
        out = []
        while self._queue and self._queue[0].offset < emitted:
            out.append(self._queue.popleft())
        return out

    def finish(self, emitted: int, cut: bool) -> list[TokenLogprob]:
        """The last entries: with ``cut`` (a stop string ended the text at ``emitted``)
        those before it, else all that are left."""
        out = self.take(emitted) if cut else list(self._queue)
        self._queue.clear()
        return out


class Event(NamedTuple):
    """One step of a response: new text, and at the end the finish reason and usage."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob] | None = None  # None: not asked for


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

    async def events(self, p: ParsedRequest, stream: TokenStream) -> AsyncIterator[Event]:
        """One ``Event`` per chunk that adds text, and a last one with the finish reason;
        cancels the request on exit unless it finished (client gone, stop string, error)."""
        detok = IncrementalDetokenizer(self.tokenizer, prompt=stream.request.token_ids)
        track = LogprobTracker(detok) if p.sampling.logprobs is not None else None
        stops = StopMatcher(p.stop)
        eos = set(p.sampling.stop_token_ids)
        usage = Usage(prompt_tokens=len(stream.request.token_ids))
        emitted = 0  # characters given out so far
        try:
            async for chunk in stream:
                ids = chunk.token_ids
                if chunk.finish_reason == "stop" and ids and ids[-1] in eos:
                    ids = ids[:-1]  # the stop token is not part of the text
                if track is not None:
                    raw = track.push(ids, chunk.logprobs, chunk.top_logprobs)
                else:
                    raw = detok.push(ids)
                text, hit = stops.push(raw)
                if chunk.usage is not None:
                    usage = chunk.usage
                else:
                    usage.completion_tokens = chunk.index + len(chunk.token_ids)
                if hit:
                    await stream.cancel("stop string")
                    emitted += len(text)
                    yield Event(text, "stop", usage,
                                track.finish(emitted, cut=True) if track else None)
                    return
                if chunk.finish_reason in ("cancelled", "error"):
                    # Not an OpenAI finish reason: the request did not complete.
                    raise (Overloaded("the request was cancelled by the server")
                           if chunk.finish_reason == "cancelled"
                           else DynamoBusError("the engine failed on this request"))
                if chunk.finish_reason is not None:
                    tail, hit = stops.push(track.flush() if track else detok.flush())
                    text += tail + stops.flush()
                    emitted += len(text)
                    yield Event(text, "stop" if hit else chunk.finish_reason, usage,
                                track.finish(emitted, cut=hit) if track else None)
                    return
                if text:
                    emitted += len(text)
                    yield Event(text, None, None, track.take(emitted) if track else None)
        finally:
            await stream.cancel()

    def _logprobs_body(self, p: ParsedRequest,
                       entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return logprobs_body(p.kind, entries, self.tokenizer.token_piece)

    async def stream_chunks(self, p: ParsedRequest, stream: TokenStream
                            ) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI ``chat.completion.chunk`` / ``text_completion`` bodies."""
        rid = ("chatcmpl-" if p.kind == "chat" else "cmpl-") + stream.request_id
        created = int(time.time())
        first = True
        # The role comes with the first text, not before it: so nothing is sent until
        # the request has reached a worker, and an early error keeps its HTTP status.
        async for ev in self.events(p, stream):
            yield chunk_body(p.kind, rid, self.model, created, ev.text, ev.finish_reason,
                             first=first, logprobs=self._logprobs_body(p, ev.logprobs))
            first = False
            if ev.finish_reason is not None and ev.usage is not None and p.include_usage:
                yield usage_chunk_body(p.kind, rid, self.model, created, ev.usage)

    async def complete(self, p: ParsedRequest, stream: TokenStream) -> dict[str, Any]:
        rid = ("chatcmpl-" if p.kind == "chat" else "cmpl-") + stream.request_id
        parts: list[str] = []
        entries: list[TokenLogprob] | None = [] if p.sampling.logprobs is not None else None
        reason, usage = "stop", Usage()
        async for ev in self.events(p, stream):
            parts.append(ev.text)
            if entries is not None and ev.logprobs:
                entries.extend(ev.logprobs)
            if ev.finish_reason is not None:
                reason, usage = ev.finish_reason, ev.usage or usage
        return full_body(p.kind, rid, self.model, int(time.time()), "".join(parts), reason,
                         usage, logprobs=self._logprobs_body(p, entries))
